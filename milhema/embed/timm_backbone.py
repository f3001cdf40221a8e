"""The ``timm/<model>`` backbone family: any model of the timm library, built without a download.

The model is created with its classifier removed (``num_classes=0``), so it returns pooled features
``[B, num_features]``. Models that take an input size (ViTs and other models with position
embeddings) are built for ``--input-size``; models that do not (CNNs) are built as they are and
simply fed crops of that size. Files in DINOv2's own layout (``mask_token``, SwiGLU ``w12``/``w3``,
chunked blocks) are renamed to timm's keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import torch

from milhema.embed.backbone import (
    MIN_INPUT_PX,
    TIMM_PREFIX,
    Backbone,
    Misfit,
    file_sha256,
    load_fitting,
    read_weights,
    recognised_as,
    register_backbone,
    seeded_init,
    tensor_state,
    vit_input_px,
)
from milhema.errors import EmbedError, did_you_mean, first_line

# DINOv2 (facebookresearch/dinov2) names the two linear layers of its SwiGLU feed-forward w12 (the
# packed gate and value projections) and w3 (the output); timm's SwiGLUPacked calls them fc1 and fc2
# and computes silu(first half) * second half as DINOv2 does, so the tensors move over unchanged.
_DINOV2_RENAMES = ((re.compile(r"\.mlp\.w12\."), ".mlp.fc1."), (re.compile(r"\.mlp\.w3\."), ".mlp.fc2."))
# With block_chunks > 0 DINOv2 stores block i of chunk c as blocks.c.i (i counts over all blocks).
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _suggest(name: str) -> list[str]:
    """``resnet18`` or ``tim/resnet18`` -> ``["timm/resnet18"]`` when timm has that model."""
    import timm

    arch = name.rsplit("/", 1)[-1]
    return [TIMM_PREFIX + arch] if arch and timm.is_model(arch) else []


@register_backbone(TIMM_PREFIX, prefix=True, suggest=_suggest,
                   summary="any timm model (timm/resnet18, timm/vit_small_patch14_dinov2, ...); weights from a "
                           "local .safetensors or state dict")
def load_timm(name: str, weights: Path | None, *, input_size: int | None) -> Backbone:
    """``timm/<model>``: the timm model, with ``weights`` loaded (or random from a fixed seed)."""
    import timm

    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        raise EmbedError(f"backbone {name!r} is not a timm model"
                         f"{did_you_mean(arch, timm.list_models(), n=3, prefix=TIMM_PREFIX)}")
    model = create_timm(arch, input_size, name)
    digest = "none"
    if weights is not None:
        raw = read_weights(weights)
        state = tensor_state(raw, weights, name)
        if "mask_token" in state:  # DINOv2's own layout (e.g. Meta's dinov2_vits14 file)
            state = dinov2_to_timm(state)

        def cause(misfit: Misfit) -> str:
            return _timm_cause(model, misfit, recognised_as(raw, name))

        # Checkpoints of the full classifier carry a head that num_classes=0 removed: not strict.
        load_fitting(model, state, weights, name, strict=False, cause=cause)
        digest = file_sha256(weights)
    config = timm.data.resolve_data_config({}, model=model)
    side = int(input_size or config["input_size"][-1])
    if side < MIN_INPUT_PX:
        raise EmbedError(f"backbone {name}: input size {side} px is too small")
    return Backbone(model=model, name=name, weights_sha256=digest, feature_dim=int(cast(int, model.num_features)),
                    input_size=side, mean=tuple(config["mean"]), std=tuple(config["std"]),
                    interpolation=str(config.get("interpolation", "bilinear")), output=_pooling(model))


def create_timm(arch: str, input_size: int | None, name: str) -> torch.nn.Module:
    """timm model ``arch`` without classifier and with random weights from the fixed seed, built for
    ``input_size`` px when the model takes an input size (a ViT's position embeddings depend on it).

    Raises:
        EmbedError: the model cannot be built for that size (e.g. windows that do not tile it).
    """
    import timm

    if input_size is not None:
        try:
            with seeded_init():
                return timm.create_model(arch, pretrained=False, num_classes=0, img_size=input_size)
        except TypeError as exc:  # a CNN: its constructor has no img_size, and needs none
            if "img_size" not in str(exc):
                raise
        except (AssertionError, ValueError, RuntimeError) as exc:
            raise EmbedError(f"backbone {name}: cannot be built for {input_size} px input "
                             f"({first_line(exc)}); choose another --input-size") from exc
    with seeded_init():
        return timm.create_model(arch, pretrained=False, num_classes=0)


def dinov2_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DINOv2 backbone state dict (facebookresearch/dinov2 key names) with timm's key names.

    Drops ``mask_token`` (used only in training), unchunks ``blocks.<chunk>.<i>.`` into ``blocks.<i>.``
    and renames the SwiGLU layers of ViT-G (``mlp.w12``/``mlp.w3`` -> ``mlp.fc1``/``mlp.fc2``).
    Other keys (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.<i>.attn.qkv``,
    ``ls1.gamma``, ``norm`` ...) are the same in both. Tensors are not copied.
    """
    out = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        for pattern, replacement in _DINOV2_RENAMES:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def _timm_cause(model: torch.nn.Module, misfit: Misfit, recognised: str) -> str:
    if misfit.key == "pos_embed" and misfit.found and misfit.expected and misfit.found[-1] == misfit.expected[-1]:
        px = vit_input_px(model, misfit.found[1])
        if px:
            return f"the file is for {px} px input: use --input-size {px}"
    if recognised:
        return recognised
    if misfit.found is None:
        return "the file was saved from another model, or is incomplete"
    return "the file was saved from another model or another size of this one"


def _pooling(model: torch.nn.Module) -> str:
    pool = getattr(model, "global_pool", None)
    kind = pool if isinstance(pool, str) else getattr(pool, "pool_type", None)
    return f"timm global_pool {kind}" if kind else "timm pooled features"
