"""Stain normalisation of cell crops before the backbone and the morphology features.

Two classic methods, from the torchstain library (numpy backend, MIT licence, numpy its only
dependency):

- ``macenko`` (Macenko et al., ISBI 2009): the two stain vectors of an image (for a Romanowsky
  stain: the nuclear azure / methylene blue and the eosin) are found in optical-density space, each
  pixel is unmixed into the two stain concentrations, and the image is rebuilt with the reference's
  stain vectors and 99th-percentile concentrations;
- ``reinhard`` (Reinhard et al., 2001): each channel of the image in LAB colour space is shifted
  and scaled to the reference's mean and standard deviation.

A reference (:class:`StainReference`) is fitted once on the cells of a training cohort (or on an
image) and saved as JSON; every slide embedded against it is mapped onto it. The parameters of
the slide being mapped (stain vectors and concentration scale, or LAB statistics) are fitted on a
sample of *that slide's* cells, not on each crop: stain varies from slide to slide, and fitting
each crop alone would also equalise the cells of one slide (a pale hypogranular neutrophil would
be darkened to look like its neighbours), erasing what the morphology features measure.

Macenko assumes a known light level through clean glass; real glass reads anywhere from 150 to
250 per channel and is often tinted. Each crop is therefore white-balanced on its own glass
first (the median colour of its brightest tenth, which follows vignetting across a camera field),
and the reference's glass colour is put back at the end. Reinhard's statistics absorb the glass
colour by themselves. Colours are RGB uint8; optical densities natural-log absorbances.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from milhema.errors import EmbedError

STAIN_METHODS: tuple[str, ...] = ("none", "macenko", "reinhard")
REFERENCE_FILE = "stain_reference.json"
REFERENCE_VERSION = 1
_IO = 240.0          # torchstain's transmitted-light level: white-balanced glass is put at this value
_GLASS_QUANTILE = 90  # the brightest tenth of a crop's pixels is taken as its glass


def _torchstain() -> Any:
    """torchstain's numpy normalisers and colour utilities (imported on first use)."""
    try:
        import torchstain.numpy as backend
    except ImportError:   # pragma: no cover - a dependency of milhema
        raise EmbedError("--stain-normalize needs the torchstain package: pip install torchstain") from None
    return backend


def glass_colour(rgb: np.ndarray) -> np.ndarray:
    """float64 (3,): the RGB colour of the glass of a crop, the per-channel median of its brightest
    tenth of pixels (by the sum of the channels)."""
    flat = rgb.reshape(-1, 3).astype(np.float64)
    total = flat.sum(axis=1)
    bright = flat[total >= np.percentile(total, _GLASS_QUANTILE)]
    return np.maximum(np.median(bright, axis=0), 1.0)


def white_balance(rgb: np.ndarray, glass: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W, 3]: ``rgb`` with its glass (default: :func:`glass_colour`) brought to 240 grey."""
    glass = glass_colour(rgb) if glass is None else glass
    return np.clip(rgb.astype(np.float64) * (_IO / glass) + 0.5, 0, 255).astype(np.uint8)


def _mosaic(images: Sequence[np.ndarray]) -> np.ndarray:
    """All pixels of ``images`` as one [N, 1, 3] uint8 image (torchstain fits on any H×W×3 array)."""
    return np.concatenate([np.asarray(i, np.uint8).reshape(-1, 1, 3) for i in images], axis=0)


def _macenko_fit(images: Sequence[np.ndarray]) -> dict[str, list[Any]]:
    """Stain matrix (3×2: nuclear stain, eosin), 99th-percentile concentrations (2) and glass (3)."""
    normaliser = _torchstain().normalizers.NumpyMacenkoNormalizer()
    glass = np.median(np.stack([glass_colour(i) for i in images]), axis=0)
    try:
        normaliser.fit(_mosaic([white_balance(i) for i in images]), Io=_IO)
    except (np.linalg.LinAlgError, ValueError, IndexError) as exc:
        raise EmbedError(f"the Macenko stain vectors cannot be estimated from these images ({exc}); "
                         "are they stained smears?") from None
    return {"stain_matrix": np.asarray(normaliser.HERef, float).round(6).tolist(),
            "max_concentrations": np.asarray(normaliser.maxCRef, float).round(6).tolist(),
            "glass": glass.round(3).tolist()}


def _reinhard_fit(images: Sequence[np.ndarray]) -> dict[str, list[Any]]:
    """Mean and standard deviation of L, a, b (torchstain's LAB scale) over the images' pixels."""
    normaliser = _torchstain().normalizers.NumpyReinhardNormalizer()
    normaliser.fit(_mosaic(images))
    return {"lab_mean": np.asarray(normaliser.target_means, float).round(6).tolist(),
            "lab_std": np.asarray(normaliser.target_stds, float).round(6).tolist()}


_FIT = {"macenko": _macenko_fit, "reinhard": _reinhard_fit}


@dataclass(frozen=True)
class StainReference:
    """What every slide is normalised to: ``method``, its fitted ``params`` (lists of floats) and
    where they were fitted (``source``: a cohort and how many cells, or an image file)."""

    method: str
    params: dict[str, list[Any]]
    source: str

    @property
    def sha256(self) -> str:
        """Hash of the method and parameters (not of ``source``): two references that normalise alike
        have the same hash."""
        text = json.dumps({"method": self.method, "params": self.params}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({"format": "milhema-stain-reference", "version": REFERENCE_VERSION,
                           "method": self.method, "params": self.params, "source": self.source,
                           "sha256": self.sha256}, indent=2, sort_keys=True) + "\n"

    def describe(self) -> str:
        """One line: method and the first 12 hex digits of the hash."""
        return f"{self.method} (reference {self.sha256[:12]})"


def fit_reference(method: str, images: Sequence[np.ndarray], source: str) -> StainReference:
    """Fit ``method`` on RGB uint8 crops (or whole images).

    Raises:
        EmbedError: an unknown method, no image, or stain vectors that cannot be estimated.
    """
    if method not in _FIT:
        raise EmbedError(f"--stain-normalize must be one of {', '.join(STAIN_METHODS)}, got {method!r}")
    if not images:
        raise EmbedError("no cell to fit the stain reference on")
    return StainReference(method, _FIT[method](images), source)


def load_reference(path: Path, method: str) -> StainReference:
    """A reference from ``path``: the ``stain_reference.json`` of an earlier ``milhema embed``, or an
    image (PNG, JPEG, TIFF …) to fit ``method`` on.

    Raises:
        EmbedError: the file is missing or unreadable, or holds a reference of another method.
    """
    if not path.is_file():
        raise EmbedError(f"--stain-reference {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            reference = StainReference(str(data["method"]), dict(data["params"]), str(data.get("source", path)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EmbedError(f"--stain-reference {path} is not a stain reference written by milhema embed "
                             f"({type(exc).__name__}: {exc})") from None
        if reference.method != method:
            raise EmbedError(f"--stain-reference {path} is a {reference.method} reference, not {method}; "
                             f"use --stain-normalize {reference.method} or fit a {method} reference")
        return reference
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EmbedError(f"--stain-reference {path} is neither a stain_reference.json nor a readable image "
                         f"({type(exc).__name__})") from None
    return fit_reference(method, [rgb], f"image {path.name}")


class SlideNormaliser:
    """Maps the crops of one slide onto a reference, with the slide's own parameters fitted on
    ``sample`` (RGB uint8 crops of that slide). Picklable: it travels to the loader workers."""

    def __init__(self, reference: StainReference, sample: Sequence[np.ndarray]) -> None:
        self.reference = reference
        self.slide = _FIT[reference.method](sample) if sample else reference.params

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3]: ``rgb`` normalised."""
        if self.reference.method == "macenko":
            return self._macenko(rgb)
        return self._reinhard(rgb)

    def _macenko(self, rgb: np.ndarray) -> np.ndarray:
        # torchstain's NumpyMacenkoNormalizer.normalize, with the source's stain matrix and
        # concentration scale those of the slide (fitted on its sample) instead of the crop alone.
        ref = self.reference.params
        source = np.asarray(self.slide["stain_matrix"], np.float64)
        scale = np.asarray(self.slide["max_concentrations"], np.float64) / np.asarray(ref["max_concentrations"])
        h, w, _ = rgb.shape
        od = -np.log((white_balance(rgb).reshape(-1, 3).astype(np.float64) + 1.0) / _IO)
        concentrations = np.linalg.lstsq(source, od.T, rcond=None)[0] / scale[:, None]
        out = _IO * np.exp(-np.asarray(ref["stain_matrix"], np.float64) @ concentrations)
        out = out.T.reshape(h, w, 3) * (np.asarray(ref["glass"], np.float64) / _IO)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def _reinhard(self, rgb: np.ndarray) -> np.ndarray:
        # torchstain's NumpyReinhardNormalizer.normalize, with the source statistics the slide's.
        utils = _torchstain().utils
        lab = utils.rgb2lab(rgb.astype(np.float32) / 255.0)
        channels = utils.lab_split(lab)
        mean, std = self.slide["lab_mean"], self.slide["lab_std"]
        ref_mean, ref_std = self.reference.params["lab_mean"], self.reference.params["lab_std"]
        result = [utils.standardize(x, m, max(s, 1e-6)) * rs + rm
                  for x, m, s, rm, rs in zip(channels, mean, std, ref_mean, ref_std, strict=True)]
        out = utils.lab2rgb(utils.lab_merge(*result))
        return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def sample_indices(n: int, k: int, seed: Sequence[int]) -> list[int]:
    """``k`` of ``range(n)`` (all when fewer), drawn with a generator seeded by ``seed``, sorted."""
    if n <= k:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(list(seed)).choice(n, size=k, replace=False))
