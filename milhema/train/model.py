"""A MIL model with its fitted input preprocessing: what a checkpoint holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from milhema.models import MILModel, MILOutput, create_model
from milhema.train.data import Batch
from milhema.train.inputs import CBCEncoder, FeatureNorm


class PatientModel(nn.Module):
    """Feature standardisation + CBC encoding + a registered MIL model.

    ``forward(batch)`` takes raw padded features and raw CBC (NaN = missing) and returns the
    MIL model's :class:`~milhema.models.MILOutput`.
    """

    def __init__(self, mil: MILModel, feature_norm: FeatureNorm, cbc_encoder: CBCEncoder | None) -> None:
        super().__init__()
        self.mil = mil
        self.feature_norm = feature_norm
        self.cbc_encoder = cbc_encoder

    def forward(self, batch: Batch) -> MILOutput:
        x = self.feature_norm(batch.x)
        cbc = self.cbc_encoder(batch.cbc) if self.cbc_encoder is not None else None
        return self.mil(x, batch.mask, cbc=cbc, coords=batch.coords, view=batch.view)


def model_spec(config: Mapping[str, Any], in_dim: int, classes: Sequence[str], cbc_columns: Sequence[str],
               views: Sequence[str]) -> dict[str, Any]:
    """Everything needed to rebuild the architecture (stored in the checkpoint's JSON)."""
    params = {k: v for k, v in config["model"].items() if k != "name"}
    if config["model"]["name"] == "multiview":
        params.setdefault("n_views", max(1, len(views)))
    fusion = config["fusion"]["mode"]
    return {
        "model": config["model"]["name"], "params": params, "fusion": fusion, "in_dim": int(in_dim),
        "classes": list(classes), "views": list(views),
        "cbc_columns": list(cbc_columns) if fusion != "none" else [],
        "cbc_log_columns": [c for c in config["data"]["cbc_log_columns"] if c in cbc_columns],
        "standardize_features": bool(config["data"]["standardize_features"]),
    }


def build_model(spec: Mapping[str, Any]) -> PatientModel:
    """A fresh (unfitted) :class:`PatientModel` from :func:`model_spec`'s output."""
    cbc_columns = spec["cbc_columns"]
    encoder = CBCEncoder(cbc_columns, spec["cbc_log_columns"]) if cbc_columns else None
    mil = create_model(spec["model"], in_dim=spec["in_dim"], n_classes=len(spec["classes"]),
                       cbc_dim=encoder.out_dim if encoder else 0, fusion=spec["fusion"] if encoder else "none",
                       **spec["params"])
    return PatientModel(mil, FeatureNorm(spec["in_dim"], spec["standardize_features"]), encoder)
