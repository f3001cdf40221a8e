"""Frozen backbones: the registry of backbone families, the :class:`Backbone` they return, and safe weights.

A backbone family is one module with a loader function registered under exact names
(``@register_backbone("dinobloom-s", ...)``) or a name prefix (``@register_backbone("timm/",
prefix=True)``); ``milhema/embed/__init__.py`` imports the family modules, which registers them.
:func:`load_backbone` looks the name up and calls the family's loader.

Weights come only from a local file (safetensors, or a PyTorch file read with ``weights_only=True``
so no pickled code can run). Without weights the caller must say ``pretrained=False`` explicitly,
and a warning says that the features are from random weights. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import math
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from milhema.errors import EmbedError, did_you_mean

TIMM_PREFIX = "timm/"
DEFAULT_BACKBONE = "timm/resnet18"
NO_BACKBONE = "none"
RANDOM_INIT_SEED = 0
MIN_INPUT_PX = 16


class RandomWeightsWarning(UserWarning):
    """Features come from a randomly initialised backbone (``--no-pretrained``)."""


class ChecksumWarning(UserWarning):
    """A weights file differs from the file its authors published under that name."""


@dataclass
class Backbone:
    """A frozen feature extractor and how to feed it.

    Attributes:
        model: ``[B, 3, H, W]`` float (normalised) -> ``[B, feature_dim]``; in eval mode, no grad.
        name: the registered name it was loaded by (``timm/<model>``, ``dinobloom-s``, ...); bags
            and checkpoints are matched on it.
        weights_sha256: SHA-256 of the weights file, or ``"none"`` for random weights.
        feature_dim: D, features per cell.
        input_size: side H = W in pixels that the model is fed.
        mean, std: per-channel normalisation of [0, 1] RGB.
        interpolation: resize filter (``bicubic``, ``bilinear``, ``nearest``).
        output: what one feature vector is (``"class token"``, ``"timm global pool avg"``, ...);
            written to the bag as ``backbone_output``.
    """

    model: torch.nn.Module
    name: str
    weights_sha256: str
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    output: str = "pooled features"


class BackboneLoader(Protocol):
    """A family's loader: builds backbone ``name`` (already known to belong to the family).

    ``weights`` is a local file, or None for random weights drawn under :func:`seeded_init` (the
    caller has checked that they were asked for, and warned); ``input_size`` is the requested input
    side in pixels, or None for the family's default. :func:`load_backbone` freezes the result.
    """

    def __call__(self, name: str, weights: Path | None, *, input_size: int | None) -> Backbone: ...


Recogniser = Callable[[Mapping[str, Any], str], str | None]
"""``(contents of a weights file, requested backbone name) -> hint``: a family that recognises a
file as its own and sees that another name was asked for returns e.g. ``"this looks like a DinoBloom
checkpoint: use --backbone dinobloom-s"``; otherwise None."""


@dataclass(frozen=True)
class BackboneFamily:
    """One registered family. ``names`` are exact names, or a single prefix when ``prefix``."""

    names: tuple[str, ...]
    prefix: bool
    load: BackboneLoader
    summary: str
    label: str
    weights_from: Callable[[str], str] | None = None
    suggest: Callable[[str], list[str]] | None = None
    recognise: Recogniser | None = None


_FAMILIES: list[BackboneFamily] = []


def register_backbone(*names: str, prefix: bool = False, summary: str = "", label: str = "",
                      weights_from: Callable[[str], str] | None = None,
                      suggest: Callable[[str], list[str]] | None = None,
                      recognise: Recogniser | None = None) -> Callable[[BackboneLoader], BackboneLoader]:
    """Decorator registering a loader for exact backbone ``names``, or for every name starting with
    ``names[0]`` when ``prefix`` (e.g. ``"timm/"``).

    Args:
        summary: one line on what the family is and where its weights come from.
        label: how error messages list the family's names (default: the names, or ``<prefix><model>``).
        weights_from: ``name -> where its weights file comes from``, said when ``--weights`` is missing.
        suggest: ``unknown name -> names this family would accept`` for "did you mean" hints
            (a prefix family cannot list its names; e.g. ``"resnet18"`` -> ``["timm/resnet18"]``).
        recognise: see :data:`Recogniser`; lets a file given to the wrong name get a hint.

    Raises:
        ValueError: a name is already registered, contains a comma or colon (names become
            ``feature_blocks`` entries), or a prefix family is given several names.
    """
    if not names or (prefix and len(names) != 1):
        raise ValueError("register_backbone needs exact names, or exactly one prefix with prefix=True")
    for name in names:
        if "," in name or ":" in name or not name:
            raise ValueError(f"backbone name {name!r}: must be non-empty, without ',' or ':'")
        for family in _FAMILIES:
            if name in family.names or (family.prefix and name.startswith(family.names[0])) or (
                    prefix and any(other.startswith(name) for other in family.names)):
                raise ValueError(f"backbone name {name!r} overlaps the registered {family.label}")

    def decorate(load: BackboneLoader) -> BackboneLoader:
        shown = label or (f"{names[0]}<model>" if prefix else ", ".join(names))
        _FAMILIES.append(BackboneFamily(tuple(names), prefix, load, summary, shown, weights_from, suggest, recognise))
        return load

    return decorate


def list_backbones() -> list[str]:
    """Every registered exact name, sorted, then each prefix family as ``<prefix><model>`` (``timm/<model>``)."""
    exact = sorted(n for f in _FAMILIES if not f.prefix for n in f.names)
    return exact + sorted(f"{f.names[0]}<model>" for f in _FAMILIES if f.prefix)


def backbone_family(name: str) -> BackboneFamily:
    """The family that loads ``name``.

    Raises:
        EmbedError: no family has this name or prefix (with the closest names as a hint).
    """
    for family in _FAMILIES:
        matches = name.startswith(family.names[0]) if family.prefix else name in family.names
        if matches:
            return family
    candidates = [n for f in _FAMILIES if not f.prefix for n in f.names]
    for family in _FAMILIES:
        if family.suggest is not None:
            candidates += family.suggest(name)
    raise EmbedError(f"unknown backbone {name!r}{did_you_mean(name, candidates)}; "
                     f"known: {', '.join(sorted(f.label for f in _FAMILIES))}")


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None, *, pretrained: bool = True,
                  input_size: int | None = None) -> Backbone:
    """Build the frozen backbone registered as ``name`` (see :func:`list_backbones`).

    Args:
        name: ``timm/<model>``, ``dinobloom-s`` ..., any registered name.
        weights: local weights file; required unless ``pretrained=False``.
        pretrained: False = random weights on purpose (warns). Nothing is ever downloaded.
        input_size: input side in pixels (e.g. 128 for small crops); None = the family's default.

    Returns:
        A :class:`Backbone` mapping ``[B, 3, input_size, input_size]`` normalised RGB to ``[B, feature_dim]``.

    Raises:
        EmbedError: unknown name, missing/unsafe/mismatching weights, unusable input size.
    """
    family = backbone_family(name)
    if input_size is not None and input_size < MIN_INPUT_PX:
        raise EmbedError(f"backbone {name}: input size {input_size} px is too small (at least {MIN_INPUT_PX})")
    if weights is None and pretrained:
        source = f" ({family.weights_from(name)})" if family.weights_from else ""
        raise EmbedError(f"backbone {name}: give a local weights file with --weights FILE{source}, or --no-pretrained "
                         "to use random weights (nothing is downloaded)")
    path = None if weights is None else Path(weights)
    backbone = family.load(name, path, input_size=input_size)
    backbone.model.eval().requires_grad_(False)
    if path is None:
        warnings.warn(f"backbone {name} has random weights (--no-pretrained): features are not pretrained",
                      RandomWeightsWarning, stacklevel=2)
    return backbone


def _no_network(name: str, weights: Path | None, *, input_size: int | None) -> Backbone:
    # `none` is handled by the embedding pipeline (no image model at all); it is registered so that
    # listings and "did you mean" know it.
    raise EmbedError("backbone 'none' has no image model: it embeds handcrafted features only "
                     "(milhema embed --backbone none --morphology)")


register_backbone(NO_BACKBONE, summary="no image model: --morphology features only")(_no_network)


@contextmanager
def seeded_init() -> Iterator[None]:
    """Build models inside this: random weights are drawn from a fixed seed, so bags embedded in separate
    (resumed or sharded) ``--no-pretrained`` runs come from the same network, and the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, as 64 hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: Path) -> dict[str, Any]:
    """The top-level mapping stored in a weights file, never unpickling code.

    ``.safetensors`` files are read by safetensors; anything else by ``torch.load(weights_only=True)``,
    which admits only tensors and plain containers and numbers. Zip-format PyTorch files are memory-
    mapped so a multi-GB checkpoint is not held twice while it is copied into the model.

    Raises:
        EmbedError: missing file, unreadable or refused contents, or not a mapping.
    """
    if not path.is_file():
        raise EmbedError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own and OSError types
            raise EmbedError(f"weights {path.name}: not a readable safetensors file ({exc})") from exc
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # weights_only refuses pickled code with UnpicklingError
        raise EmbedError(f"weights {path.name}: refused, not a plain tensor state dict (only tensors are "
                         f"loaded, never pickled code: {_refusal_reason(exc)}); convert weights you trust "
                         "to .safetensors") from exc
    if not isinstance(raw, dict):
        raise EmbedError(f"weights {path.name}: expected a mapping of tensor names to tensors, "
                         f"found {type(raw).__name__}")
    return raw


def tensor_state(raw: Mapping[str, Any], path: Path, name: str) -> dict[str, torch.Tensor]:
    """``raw`` as a flat state dict: a ``state_dict`` / ``model`` / ``model_state_dict`` wrapper is
    opened and ``module.`` prefixes (DataParallel) are removed.

    Raises:
        EmbedError: not a mapping of names to tensors (with a hint when another family recognises the file).
    """
    state: Any = raw
    for key in ("state_dict", "model", "model_state_dict"):
        if key in raw and isinstance(raw[key], dict):
            state = raw[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = recognised_as(raw, name)
        raise EmbedError(f"weights {path.name}: expected a mapping of tensor names to tensors"
                         f"{f'; {hint}' if hint else ''}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def recognised_as(raw: Mapping[str, Any], requested: str) -> str:
    """The first registered family's hint that ``raw`` belongs to another backbone than ``requested``, or ``""``."""
    for family in _FAMILIES:
        if family.recognise is not None:
            hint = family.recognise(raw, requested)
            if hint:
                return hint
    return ""


@dataclass(frozen=True)
class Misfit:
    """The first tensor where a file and a model disagree. ``found`` None: the file lacks it;
    ``expected`` None: the model has no such tensor. ``others``: how many more disagree."""

    key: str
    found: tuple[int, ...] | None
    expected: tuple[int, ...] | None
    others: int

    def describe(self) -> str:
        """E.g. ``pos_embed: the file has [1, 257, 384], the model expects [1, 1370, 384]``."""
        if self.found is None:
            text = f"the file has no {self.key} (the model expects {_shape(self.expected)})"
        elif self.expected is None:
            text = f"the file has {self.key} {_shape(self.found)}, which the model does not have"
        else:
            text = f"{self.key}: the file has {_shape(self.found)}, the model expects {_shape(self.expected)}"
        return text + (f" (and {self.others} more tensors differ)" if self.others else "")


def _shape(shape: tuple[int, ...] | None) -> str:
    return "[" + ", ".join(str(s) for s in shape or ()) + "]"


def find_misfit(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *,
                strict: bool) -> Misfit | None:
    """Compare a state dict with a model's. Shape differences are reported before missing tensors (they
    say more about the cause), then, when ``strict``, tensors the model does not have.

    Returns:
        None when ``state`` fits ``own``.
    """
    wrong = [Misfit(k, tuple(state[k].shape), tuple(v.shape), 0) for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [Misfit(k, None, tuple(v.shape), 0) for k, v in own.items() if k not in state]
    extra = [Misfit(k, tuple(v.shape), None, 0) for k, v in state.items() if k not in own] if strict else []
    found = wrong + missing + extra
    if not found:
        return None
    first = found[0]
    return Misfit(first.key, first.found, first.expected, len(found) - 1)


def load_fitting(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str, *,
                 strict: bool, cause: Callable[[Misfit], str]) -> None:
    """Load ``state`` into ``model`` or refuse on one line naming the first misfit and its likely cause.

    Args:
        strict: tensors the model does not have are refused too (else dropped, e.g. a classifier head).
        cause: the family's reading of a misfit (``"the file is for 224 px input: use --input-size 224"``).

    Raises:
        EmbedError: ``weights <file> do not fit backbone <name>: <misfit>; <cause>``.
    """
    own = model.state_dict()
    misfit = find_misfit(own, state, strict=strict)
    if misfit is not None:
        reason = cause(misfit)
        raise EmbedError(f"weights {path.name} do not fit backbone {name}: {misfit.describe()}"
                         f"{f'; {reason}' if reason else ''}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


def vit_input_px(model: torch.nn.Module, pos_tokens: int) -> int | None:
    """The square input side in pixels a ViT position embedding of ``pos_tokens`` tokens was made for
    (``pos_tokens`` minus the class/register tokens it includes must be a square number of patches)."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    side = math.isqrt(max(pos_tokens - prefix, 0))
    if side == 0 or side * side != pos_tokens - prefix:
        return None
    return side * int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def _refusal_reason(exc: Exception) -> str:
    """The line of torch's refusal that names what was refused (its first lines advise unsafe loading)."""
    lines = [line.strip().rstrip(".") for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")]
    if named:
        return named[0]
    if lines and not lines[0].startswith("Weights only load failed"):
        return lines[0]
    return type(exc).__name__
