"""Checkpoints: weights as safetensors, everything else as JSON. Loading never unpickles.

``<name>.safetensors`` holds the state dict (model weights and the fitted preprocessing
buffers); ``<name>.json`` holds the architecture spec, the classes, the backbone and feature
size the model was trained on, and which patients it was tested on (cv folds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from milhema.errors import MilhemaError
from milhema.io import write_text
from milhema.train.data import BagInfo
from milhema.train.model import PatientModel, build_model
from milhema.version import __version__


class CheckpointError(MilhemaError):
    """A checkpoint is missing, unreadable, or does not fit the bags."""


def save_checkpoint(stem: Path, model: PatientModel, spec: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write ``stem.safetensors`` and ``stem.json`` (each via a temporary file and a rename)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file(state, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())  # on disk before the rename, and before a cv fold is marked done
    os.replace(tmp, weights)
    document = {"format": "milhema-checkpoint", "format_version": 1, "created_with": f"milhema {__version__}",
                "spec": dict(spec), "temperature": model.temperature, **dict(meta)}
    write_text(stem.with_suffix(".json"), json.dumps(document, indent=2) + "\n", durable=True)
    return weights


def read_weights_pair(stem: Path, what: str, error: type[MilhemaError]) -> tuple[Any, dict[str, torch.Tensor]]:
    """The parsed ``stem.json`` and the tensors of ``stem.safetensors`` (no pickle), for a checkpoint or
    any other weights saved as such a pair; ``what`` names it in the ``error`` raised for a missing or
    damaged file."""
    meta_path, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not meta_path.is_file() or not weights.is_file():
        raise error(f"{what} {stem.name}: {meta_path.name} and {weights.name} are both needed in {stem.parent}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        state = load_file(str(weights))
    except Exception as exc:  # json and safetensors raise several types for a damaged file
        raise error(f"{what} {stem.name}: cannot read it ({str(exc).splitlines()[0]})") from exc
    return meta, state


def load_checkpoint(stem: Path) -> tuple[PatientModel, dict[str, Any]]:
    """Rebuild the model of ``stem.json`` and load ``stem.safetensors`` into it."""
    meta, state = read_weights_pair(stem, "checkpoint", CheckpointError)
    meta_path = stem.with_suffix(".json")
    if meta.get("format") != "milhema-checkpoint":
        raise CheckpointError(f"{meta_path}: not a milhema checkpoint")
    model = build_model(meta["spec"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {stem.name}: weights do not match its architecture "
                              f"({str(exc).splitlines()[0]})") from exc
    temperature = meta.get("temperature", 1.0)   # checkpoints before calibration: none
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 < temperature < 1e3:
        raise CheckpointError(f"checkpoint {stem.name}: temperature {temperature!r} is not a positive number")
    model.temperature = float(temperature)
    model.eval()
    return model, meta


def check_compatible(meta: Mapping[str, Any], bags: BagInfo, where: str) -> None:
    """Refuse bags made with another backbone or feature size than the model was trained on."""
    trained = meta["bags"]
    if trained["feature_dim"] != bags.feature_dim or trained["backbone"] != bags.backbone:
        raise CheckpointError(
            f"the model in {where} was trained on bags from {trained['backbone']} ({trained['feature_dim']} "
            f"features per cell) but these bags come from {bags.backbone} ({bags.feature_dim}); "
            "embed the cohort with the same backbone and options")
    if trained.get("columns") != (None if bags.columns is None else list(bags.columns)):
        raise CheckpointError(f"the model in {where} used other feature columns of the bags than data.feature_blocks "
                              "selects now; embed with the same options")
    if trained.get("weights_sha256") != bags.weights_sha256:
        raise CheckpointError(
            f"the model in {where} was trained on {trained['backbone']} features with weights "
            f"{trained.get('weights_sha256', 'none')[:12]} but these bags used weights {bags.weights_sha256[:12]}")
