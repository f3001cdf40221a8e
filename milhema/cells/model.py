"""The cell classifier on frozen features, and its files (safetensors + JSON; nothing is unpickled).

:class:`CellClassifier` standardises a cell's features (means and deviations of the training
cells), then a head (``linear``: a linear probe; ``mlp``: one hidden layer) gives the logits of
the T cell types and, when the annotations carry attributes, of the A anomaly attributes
(independent, multi-label). Calibration fitted on the validation split is part of the weights:
a temperature and per-type biases for the types, a scale and shift per attribute (Platt).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from milhema.errors import MilhemaError
from milhema.io import write_text
from milhema.train.checkpoint import read_weights_pair
from milhema.version import __version__

FORMAT = "milhema-cell-classifier"
RUN_FORMAT = "milhema-cell-classifier-run"   # a run folder's classifier.json: the fold models together
CLASSIFIER_FILE = "classifier.json"
CLASSIFIER_DIR = "classifier"


class CellClassifierError(MilhemaError):
    """A cell classifier's files are missing, damaged, or do not fit the bags."""


class CellClassifier(nn.Module):
    """Standardised features ``[N, D]`` -> type logits ``[N, T]`` and attribute logits ``[N, A]`` (or None)."""

    mean: torch.Tensor
    std: torch.Tensor
    temperature: torch.Tensor
    type_bias: torch.Tensor
    attribute_scale: torch.Tensor
    attribute_shift: torch.Tensor
    type_prior: torch.Tensor

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__()
        in_dim, n_types, n_attr = int(spec["in_dim"]), len(spec["types"]), len(spec["attributes"])
        self.spec = dict(spec)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        width = in_dim
        self.trunk: nn.Module = nn.Identity()
        if spec["head"] == "mlp":
            width = int(spec["hidden_dim"])
            self.trunk = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Dropout(float(spec["dropout"])))
        self.types = nn.Linear(width, n_types)
        self.attributes = nn.Linear(width, n_attr) if n_attr else None
        # Calibration (identity until fitted): softmax(logits / temperature + type_bias), sigmoid(scale * z + shift).
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("type_bias", torch.zeros(n_types))
        self.register_buffer("attribute_scale", torch.ones(n_attr))
        self.register_buffer("attribute_shift", torch.zeros(n_attr))
        # Frequency of each type among the training cells: the calibrated probabilities are for that mix.
        self.register_buffer("type_prior", torch.full((n_types,), 1.0 / n_types))

    def fit_standardisation(self, features: np.ndarray) -> None:
        """Means and deviations of the training cells' features ``[N, D]`` (constant columns keep sd 1)."""
        x = torch.as_tensor(np.asarray(features, np.float64))
        self.mean.copy_(x.mean(dim=0).float())
        sd = x.std(dim=0).float() if len(x) > 1 else torch.ones_like(self.std)
        self.std.copy_(torch.where(sd > 1e-6, sd, torch.ones_like(sd)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.trunk((x - self.mean) / self.std)
        return self.types(h), None if self.attributes is None else self.attributes(h)

    @torch.no_grad()
    def probabilities(self, features: np.ndarray, device: torch.device | None = None, batch: int = 8192,
                      calibrated: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Type probabilities ``[N, T]`` and attribute probabilities ``[N, A]`` (or None) of ``features [N, D]``,
        calibrated unless ``calibrated`` is false (for measuring what calibration does)."""
        device = device or torch.device("cpu")
        self.eval()
        self.to(device)
        types, attributes = [], []
        x = np.asarray(features, np.float32)
        for start in range(0, len(x), batch):
            t, a = self(torch.from_numpy(x[start:start + batch]).to(device))
            if calibrated:
                t = t / self.temperature + self.type_bias
                a = None if a is None else a * self.attribute_scale + self.attribute_shift
            types.append(torch.softmax(t, dim=1).cpu().numpy())
            if a is not None:
                attributes.append(torch.sigmoid(a).cpu().numpy())
        n_types = len(self.spec["types"])
        type_probs = np.concatenate(types) if types else np.zeros((0, n_types), np.float32)
        if self.attributes is None:
            return type_probs, None
        n_attr = len(self.spec["attributes"])
        return type_probs, np.concatenate(attributes) if attributes else np.zeros((0, n_attr), np.float32)


def decide(type_probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The predicted type ``[N]`` of each row of calibrated ``type_probs [N, T]``: the most likely under equal
    type frequencies, ``argmax p[t] / prior[t]`` (the rule that maximises balanced accuracy; plain argmax
    would favour the common types). A type absent from training (prior 0) is never chosen."""
    prior = np.asarray(prior, np.float64)
    ratio = np.asarray(type_probs, np.float64) / np.where(prior > 0, prior, 1.0)
    ratio[:, prior <= 0] = -1.0
    return ratio.argmax(axis=1) if len(ratio) else np.zeros(0, np.int64)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_classifier(stem: Path, model: CellClassifier, meta: Mapping[str, Any]) -> str:
    """Write ``stem.safetensors`` (weights, standardisation, calibration) and ``stem.json`` (spec, ``meta``)
    through temporary files; return the SHA-256 of the weights file."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, weights)
    sha = file_sha256(weights)
    document = {"format": FORMAT, "format_version": 1, "created_with": f"milhema {__version__}",
                "spec": model.spec, "weights_sha256": sha, **dict(meta)}
    write_text(stem.with_suffix(".json"), json.dumps(document, indent=2) + "\n", durable=True)
    return sha


def load_classifier(stem: Path) -> tuple[CellClassifier, dict[str, Any]]:
    """The classifier of ``stem.json`` with the weights of ``stem.safetensors`` (checked against its SHA-256).

    Raises:
        CellClassifierError: a missing or damaged file, or weights that are not the ones recorded.
    """
    meta, state = read_weights_pair(stem, "cell classifier", CellClassifierError)
    meta_path, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("spec"), dict):
        raise CellClassifierError(f"{meta_path}: not a milhema cell classifier")
    if meta.get("weights_sha256") != file_sha256(weights):
        raise CellClassifierError(f"cell classifier {stem.name}: {weights.name} is not the file it was saved as "
                                  "(SHA-256 differs); restore the run folder or train again")
    try:
        model = CellClassifier(meta["spec"])
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CellClassifierError(f"cell classifier {stem.name}: weights do not match its spec "
                                  f"({str(exc).splitlines()[0]})") from exc
    model.eval()
    return model, meta
