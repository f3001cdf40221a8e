"""DinoBloom (Koch et al., MICCAI 2024): DINOv2 ViTs trained on single blood and marrow cells.

The authors publish four checkpoints on Zenodo, record 10908163
(https://zenodo.org/records/10908163): ``DinoBloom-S.pth``, ``-B``, ``-L``, ``-G``. Each is a
PyTorch file ``{"teacher": {"backbone.<DINOv2 key>": tensor, ..., "dino_head.*", "ibot_head.*"}}``
of a DINOv2 ViT with 14 px patches and position embeddings for 224 px input (257 tokens: 16 x 16
patches and the class token). milhema loads it into timm's DINOv2 ViT built for 224 px: ``backbone.``
is stripped, the DINO/iBOT heads and ``mask_token`` are dropped, DINOv2 key names become timm's
(:func:`~milhema.embed.timm_backbone.dinov2_to_timm`), and every other tensor must fit exactly.

Names: ``dinobloom-s|b|l|g`` give the class token after the final norm (what the authors' code
returns), 384 / 768 / 1024 / 1536 features; ``dinobloom-<v>+mean`` gives the class token followed
by the mean of the patch tokens (DINOv2's linear-probe features), twice as many.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from milhema.embed.backbone import (
    Backbone,
    ChecksumWarning,
    Misfit,
    file_sha256,
    load_fitting,
    read_weights,
    recognised_as,
    register_backbone,
    vit_input_px,
)
from milhema.embed.timm_backbone import create_timm, dinov2_to_timm
from milhema.errors import EmbedError

ZENODO = "Zenodo record 10908163"
INPUT_PX = 224
MEAN_SUFFIX = "+mean"
# DINOv2 and DinoBloom normalise with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HEADS = ("dino_head.", "ibot_head.")
_PREFIX = "backbone."


@dataclass(frozen=True)
class Variant:
    """One published DinoBloom model: its timm architecture, width and file."""

    letter: str
    arch: str
    width: int
    file: str
    sha256: str | None


# Only DinoBloom-S's SHA-256 is known here, from a second source (the STAMP pipeline checks the file it
# downloads against it); the B/L/G sums could not be verified without the files, so they are not checked.
VARIANTS = {
    "s": Variant("s", "vit_small_patch14_dinov2", 384, "DinoBloom-S.pth",
                 "c2f7990b003e89bcece80e379fb8fe0ba2ec392ce19b286e8a294abd99568e44"),
    "b": Variant("b", "vit_base_patch14_dinov2", 768, "DinoBloom-B.pth", None),
    "l": Variant("l", "vit_large_patch14_dinov2", 1024, "DinoBloom-L.pth", None),
    "g": Variant("g", "vit_giant_patch14_dinov2", 1536, "DinoBloom-G.pth", None),
}
NAMES = tuple(f"dinobloom-{v}{suffix}" for v in VARIANTS for suffix in ("", MEAN_SUFFIX))


class ClassAndMeanPatch(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, 2 D]``: a timm ViT's class token and its mean patch token, both after the final norm."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.num_features = 2 * int(cast(int, vit.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = cast(Any, self.vit)  # timm's VisionTransformer; nn.Module attributes are untyped
        tokens = vit.forward_features(x)                          # [B, prefix + patches, D]
        prefix = int(vit.num_prefix_tokens)
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=1)


def _variant(raw: Mapping[str, Any]) -> Variant | None:
    """The published variant whose width a DinoBloom-layout file has, or None for another layout."""
    teacher = raw.get("teacher")
    if not isinstance(teacher, Mapping):
        return None
    cls_token = teacher.get(_PREFIX + "cls_token")
    if not isinstance(cls_token, torch.Tensor):
        return None
    return next((v for v in VARIANTS.values() if v.width == cls_token.shape[-1]), None)


def _recognise(raw: Mapping[str, Any], requested: str) -> str | None:
    """Hint for a DinoBloom checkpoint given to another name (a timm model, or another variant)."""
    variant = _variant(raw)
    if variant is None:
        return None
    suffix = MEAN_SUFFIX if requested.endswith(MEAN_SUFFIX) else ""
    fitting = f"dinobloom-{variant.letter}{suffix}"
    if requested == fitting:
        return None
    return (f"this looks like a DinoBloom checkpoint ({variant.width} features, as {variant.file}): "
            f"use --backbone {fitting}")


def _weights_from(name: str) -> str:
    return f"{_variant_of(name).file} from {ZENODO}, https://zenodo.org/records/10908163"


def _variant_of(name: str) -> Variant:
    return VARIANTS[name.removesuffix(MEAN_SUFFIX)[-1]]


@register_backbone(*NAMES, recognise=_recognise, label="dinobloom-s|b|l|g[+mean]", weights_from=_weights_from,
                   summary=f"DinoBloom S/B/L/G (DINOv2 ViT/14, 224 px) from {ZENODO}; +mean adds the mean patch token")
def load_dinobloom(name: str, weights: Path | None, *, input_size: int | None) -> Backbone:
    """``dinobloom-<s|b|l|g>[+mean]``: timm's DINOv2 ViT at 224 px with the published teacher backbone."""
    mean = name.endswith(MEAN_SUFFIX)
    variant = _variant_of(name)
    if input_size not in (None, INPUT_PX):
        raise EmbedError(f"backbone {name} takes {INPUT_PX} px cells (its position embeddings are for {INPUT_PX} px); "
                         "leave out --input-size")
    vit = create_timm(variant.arch, INPUT_PX, name)
    digest = "none"
    if weights is not None:
        raw = read_weights(weights)
        state = published_state(raw, weights, name)

        def cause(misfit: Misfit) -> str:
            return _dinobloom_cause(vit, misfit, recognised_as(raw, name))

        load_fitting(vit, state, weights, name, strict=True, cause=cause)
        digest = file_sha256(weights)
        _check_published(variant, weights, digest)
    model: nn.Module = ClassAndMeanPatch(vit) if mean else vit
    return Backbone(model=model, name=name, weights_sha256=digest, feature_dim=int(cast(int, model.num_features)),
                    input_size=INPUT_PX, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
                    output="class token + mean patch token" if mean else "class token")


def published_state(raw: Mapping[str, Any], path: Path, name: str) -> dict[str, torch.Tensor]:
    """The backbone of a published DinoBloom file, with timm's key names.

    Accepts the published layout ``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``, and
    the same backbone saved flat (``cls_token``, ``pos_embed``, ``blocks.*`` ... at the top level, as
    the authors' loader holds it).

    Raises:
        EmbedError: another layout, or a teacher holding tensors that are neither backbone nor head.
    """
    teacher = raw.get("teacher")
    if isinstance(teacher, Mapping):
        state = {k[len(_PREFIX):]: v for k, v in teacher.items() if k.startswith(_PREFIX)}
        other = [k for k in teacher if not k.startswith((_PREFIX, *_HEADS))]
        if not state or other:
            found = other[0] if other else next(iter(teacher), "nothing")
            raise EmbedError(f"weights {path.name}: not a DinoBloom checkpoint: its 'teacher' holds {found!r}, "
                             f"expected only backbone.*, dino_head.* and ibot_head.* tensors ({ZENODO})")
    elif isinstance(raw.get("cls_token"), torch.Tensor) and isinstance(raw.get("pos_embed"), torch.Tensor):
        state = dict(raw)
    else:
        keys = ", ".join(repr(k) for k in list(raw)[:3]) or "nothing"
        hint = recognised_as(raw, name)
        raise EmbedError(f"weights {path.name}: not a DinoBloom checkpoint: expected {{'teacher': {{'backbone.…': "
                         f"tensor}}}} as published in {ZENODO}, found {keys}{f'; {hint}' if hint else ''}")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EmbedError(f"weights {path.name}: expected tensors in the DinoBloom backbone")
    return dinov2_to_timm(state)


def _dinobloom_cause(vit: nn.Module, misfit: Misfit, recognised: str) -> str:
    if recognised:
        return recognised
    if misfit.key == "pos_embed" and misfit.found and misfit.expected and misfit.found[-1] == misfit.expected[-1]:
        px = vit_input_px(vit, misfit.found[1])
        return (f"the file is for {px or 'another'} px input, the published DinoBloom files for {INPUT_PX} px: "
                "not a published DinoBloom checkpoint")
    return f"not a published DinoBloom checkpoint of this size ({ZENODO})"


def _check_published(variant: Variant, path: Path, digest: str) -> None:
    # A file that differs from the published one still loads (it may be the authors' later upload or
    # a re-save), but bags embedded with it will not match bags made elsewhere with "dinobloom-<v>".
    if variant.sha256 is not None and digest != variant.sha256:
        warnings.warn(f"{path.name} differs from the published {variant.file} (SHA-256 {digest[:12]}… instead of "
                      f"{variant.sha256[:12]}…): its features will not match DinoBloom-{variant.letter.upper()} "
                      "features embedded elsewhere", ChecksumWarning, stacklevel=3)
