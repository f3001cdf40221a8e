"""White-cell detectors by name: ``@register_detector("name")`` on a function, ``get_detector`` to find one.

A detector is a function ``(WholeSlide, DetectOptions) -> Detections`` over one image: a scan, or
one photographed field read through the same :class:`~milhema.slides.wsi.WholeSlide` interface
(:class:`~milhema.slides.fields.FieldImage`). Two are built in:

- ``stain`` (the default): :func:`milhema.slides.detect.detect_cells`, which finds white cells by
  their nuclear stain;
- ``external``: :func:`milhema.slides.external.detect_external`, the cells listed in a QuPath
  GeoJSON or a CSV beside the image.

``milhema embed --detector NAME`` picks one. Each detector has a signature (:meth:`Detector.signature`):
its name, version, the settings its result depends on and the SHA-256 of the files it reads beside
the image. It is stored with the cached detections and in each bag's ``embed_signature``, so a changed
detector, setting or input file is detected again instead of reused.

A new detector: a function in its own module, decorated with ``@register_detector("name")``, and
that module imported at the end of this one (as ``milhema/models/__init__.py`` imports the models).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from milhema.errors import MilhemaError, did_you_mean
from milhema.slides.detect import DETECTOR_VERSION, Detections, DetectOptions, detect_cells
from milhema.slides.external import EXTERNAL_VERSION, detect_external, detections_path
from milhema.slides.wsi import WholeSlide

DetectFunction = Callable[[WholeSlide, DetectOptions], Detections]
SettingsOf = Callable[[DetectOptions], Mapping[str, Any]]
InputsOf = Callable[[str, Path], Sequence[Path]]
DEFAULT_DETECTOR = "stain"
# DetectOptions fields that say how to run, not what is found: never part of a signature.
RUN_OPTIONS = ("workers", "progress")


class UnknownDetectorError(MilhemaError):
    """No detector is registered under the name asked for."""


@dataclass(frozen=True)
class Detector:
    """A registered detector.

    Attributes:
        name: what ``--detector`` names.
        detect: ``(image, options) -> Detections`` in the image's level-0 pixels.
        version: bumped by the detector's author when the same settings would find other cells.
        settings: the ``DetectOptions`` values the result depends on (None: none of them).
        inputs: ``(slide_id, image path) -> files`` the detector reads beside the image (None: none);
            raises a :class:`MilhemaError` when they are missing.
    """

    name: str
    detect: DetectFunction
    version: int = 1
    settings: SettingsOf | None = None
    inputs: InputsOf | None = None

    def signature(self, options: DetectOptions, slide_id: str, images: Sequence[Path]) -> str:
        """JSON text of everything the detections of ``images`` (one scan, or a slide's fields) depend on.

        Raises:
            MilhemaError: an input file of the detector is missing (from ``inputs``).
        """
        made: dict[str, Any] = {"detector": self.name, "version": self.version}
        if self.settings is not None:
            made.update(self.settings(options))
        if self.inputs is not None:
            made["inputs"] = [[path.name, _sha256(path)] for image in images for path in self.inputs(slide_id, image)]
        return json.dumps(made, sort_keys=True)


_REGISTRY: dict[str, Detector] = {}


def register_detector(name: str, *, version: int = 1, settings: SettingsOf | None = None,
                      inputs: InputsOf | None = None) -> Callable[[DetectFunction], DetectFunction]:
    """Function decorator registering a detector ``(WholeSlide, DetectOptions) -> Detections`` as ``name``.

    Args:
        version: raise it when the function would find other cells with the same settings.
        settings: which ``DetectOptions`` values the result depends on (for the signature).
        inputs: the files beside an image the detector reads (hashed into the signature).

    Raises:
        ValueError: ``name`` is empty or holds a comma, or is registered to another function.
    """
    if not name or "," in name or name != name.strip():
        raise ValueError(f"detector name {name!r} must be non-empty, without commas or surrounding spaces")

    def decorate(function: DetectFunction) -> DetectFunction:
        known = _REGISTRY.get(name)
        if known is not None and known.detect is not function:
            raise ValueError(f"detector name {name!r} is already registered to {known.detect.__qualname__}")
        _REGISTRY[name] = Detector(name, function, version, settings, inputs)
        return function

    return decorate


def list_detectors() -> list[str]:
    """Names of all registered detectors, sorted."""
    return sorted(_REGISTRY)


def get_detector(name: str) -> Detector:
    """The detector registered as ``name``.

    Raises:
        UnknownDetectorError: none is (with the registered names and the closest one).
    """
    if name not in _REGISTRY:
        raise UnknownDetectorError(f"detector {name!r} is not registered; available: {', '.join(list_detectors())}"
                                   f"{did_you_mean(str(name), list_detectors())}")
    return _REGISTRY[name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stain_settings(options: DetectOptions) -> dict[str, Any]:
    return {k: v for k, v in asdict(options).items() if k not in RUN_OPTIONS}


# The built-in detectors. The stain signature is the one milhema wrote before the registry existed,
# so bags embedded then are still recognised as finished.
register_detector("stain", version=DETECTOR_VERSION, settings=_stain_settings)(detect_cells)
register_detector("external", version=EXTERNAL_VERSION,
                  inputs=lambda slide_id, image: [detections_path(slide_id, image)])(detect_external)

# Detectors in modules of their own register themselves when imported: import them here, after the
# built-ins (as milhema/models/__init__.py imports the models), so that --detector finds them.
