"""Frozen timm backbones: creation without any download, local weights, preprocessing constants.

Weights come only from a local file (safetensors, or a PyTorch state dict read with
``weights_only=True`` so no pickled code can run). Without weights the caller must say
``pretrained=False`` explicitly, and a warning says that the features are from random weights.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from milhema.errors import EmbedError, did_you_mean

TIMM_PREFIX = "timm/"
DEFAULT_BACKBONE = "timm/resnet18"
RANDOM_INIT_SEED = 0


class RandomWeightsWarning(UserWarning):
    """Features come from a randomly initialised backbone (``--no-pretrained``)."""


@dataclass
class Backbone:
    """A frozen feature extractor and how to feed it.

    Attributes:
        model: ``[B, 3, H, W]`` float (normalised) -> ``[B, feature_dim]``; in eval mode, no grad.
        name: ``timm/<model>``.
        weights_sha256: SHA-256 of the weights file, or ``"none"`` for random weights.
        input_size: side H = W in pixels that the model is fed.
        mean, std: per-channel normalisation of [0, 1] RGB.
        interpolation: resize filter from the model's data config (``bicubic``, ``bilinear``).
    """

    model: torch.nn.Module
    name: str
    weights_sha256: str
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None, *, pretrained: bool = True,
                  input_size: int | None = None) -> Backbone:
    """Create a frozen timm model ``name`` (``timm/<model>``) with its classifier removed.

    Args:
        weights: local weights file; required unless ``pretrained=False``.
        pretrained: False = random weights on purpose (warns). Nothing is ever downloaded.
        input_size: override of the model's default input side in pixels (e.g. 128 for small crops).

    Raises:
        EmbedError: unknown model, missing/unsafe/mismatching weights.
    """
    import timm

    if not name.startswith(TIMM_PREFIX):
        raise EmbedError(f"backbone {name!r}: expected 'timm/<model name>', e.g. {DEFAULT_BACKBONE}")
    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        raise EmbedError(f"backbone {name!r} is not a timm model"
                         f"{did_you_mean(arch, timm.list_models(), n=3, prefix=TIMM_PREFIX)}")
    if weights is None and pretrained:
        raise EmbedError(f"backbone {name}: give a local weights file with --weights FILE, or --no-pretrained "
                         "to use random weights (nothing is downloaded)")
    # Random weights are drawn from a fixed seed: bags embedded in separate (resumed or sharded)
    # runs must come from the same network to be comparable.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    digest = "none"
    if weights is not None:
        digest = _load_weights(model, Path(weights), name)
    else:
        warnings.warn(f"backbone {name} has random weights (--no-pretrained): features are not pretrained",
                      RandomWeightsWarning, stacklevel=2)
    model.eval().requires_grad_(False)
    config = timm.data.resolve_data_config({}, model=model)
    side = int(input_size or config["input_size"][-1])
    if side < 16:
        raise EmbedError(f"backbone {name}: input size {side} px is too small")
    return Backbone(model=model, name=name, weights_sha256=digest, feature_dim=int(cast(int, model.num_features)),
                    input_size=side, mean=tuple(config["mean"]), std=tuple(config["std"]),
                    interpolation=str(config.get("interpolation", "bilinear")))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_weights(model: torch.nn.Module, path: Path, name: str) -> str:
    if not path.is_file():
        raise EmbedError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own and OSError types
            raise EmbedError(f"weights {path.name}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled code with UnpicklingError
            raise EmbedError(f"weights {path.name}: refused, not a plain tensor state dict (only tensors are "
                             f"loaded, never pickled code: {_refusal_reason(exc)}); convert weights you trust "
                             "to .safetensors") from exc
    state = _unwrap(state, path)
    own = model.state_dict()
    # Checkpoints of the full classifier carry a head that num_classes=0 removed; drop it.
    usable = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in usable]
    wrong = [k for k, v in usable.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong or len(missing) > 0:
        detail = f"shape mismatch at {wrong[0]}" if wrong else f"{len(missing)} tensors missing, e.g. {missing[0]}"
        raise EmbedError(f"weights {path.name} do not fit backbone {name} ({detail})")
    model.load_state_dict(usable, strict=True)
    return file_sha256(path)


def _refusal_reason(exc: Exception) -> str:
    """The line of torch's refusal that names what was refused (its first lines advise unsafe loading)."""
    lines = [line.strip().rstrip(".") for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")]
    if named:
        return named[0]
    if lines and not lines[0].startswith("Weights only load failed"):
        return lines[0]
    return type(exc).__name__


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EmbedError(f"weights {path.name}: expected a mapping of tensor names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
