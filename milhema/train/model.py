"""A MIL model with its fitted input preprocessing: what a checkpoint holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from milhema.errors import MilhemaError
from milhema.models import MILModel, MILOutput, canonical_name, create_model, model_params
from milhema.settings import Settings
from milhema.train.data import BagInfo, Batch
from milhema.train.inputs import CBCEncoder, FeatureNorm
from milhema.train.survival import SurvivalHead


class PatientModel(nn.Module):
    """Feature standardisation + CBC encoding + a registered MIL model (+ a survival head).

    ``forward(batch)`` takes raw padded features and raw CBC (NaN = missing) and returns the
    MIL model's :class:`~milhema.models.MILOutput`; with a survival head its ``survival`` field holds
    the head's raw output ``[B, 1]`` (Cox) or ``[B, K]`` (discrete time), read from the bag embedding,
    so every model family gets survival without knowing about it.

    ``temperature`` divides the logits when probabilities are reported (:mod:`milhema.train.calibration`):
    1.0 while training, fitted on the inner validation split after it, and kept in the checkpoint.

    ``eval_subsample`` is ``(draws, cells)`` when the spec asks for subsampled evaluation
    (``data.eval_subsample``): :func:`~milhema.train.inference.predict` then reports the mean of
    ``draws`` predictions of ``cells``-cell subsamples of each bag; None = whole bags.
    """

    def __init__(self, mil: MILModel, feature_norm: FeatureNorm, cbc_encoder: CBCEncoder | None,
                 survival: SurvivalHead | None = None, spec: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.mil = mil
        self.feature_norm = feature_norm
        self.cbc_encoder = cbc_encoder
        self.survival = survival
        self.spec = dict(spec or {})
        self.temperature = 1.0
        sub = self.spec.get("eval_subsample")
        self.eval_subsample: tuple[int, int] | None = (int(sub["draws"]), int(sub["cells"])) if sub else None

    def forward(self, batch: Batch) -> MILOutput:
        x = self.feature_norm(batch.x)
        cbc = self.cbc_encoder(batch.cbc) if self.cbc_encoder is not None else None
        out = self.mil(x, batch.mask, cbc=cbc, coords=batch.coords, view=batch.view, slide=batch.slide)
        if self.survival is not None:
            out = dataclasses.replace(out, survival=self.survival(out.embedding))
        return out


def model_spec(settings: Settings, in_dim: int, classes: Sequence[str], patient_features: Sequence[str],
               views: Sequence[str]) -> dict[str, Any]:
    """Everything needed to rebuild the architecture (stored in the checkpoint's JSON).

    The patient-level inputs keep their first name in checkpoints: ``cbc_columns`` (the
    ``patient_features`` the model reads, [] without fusion) and ``cbc_log_columns``.
    """
    params = dict(settings.model.params)
    if "n_views" in model_params(settings.model.name):  # multi-view models: one view per slides.csv view
        params.setdefault("n_views", max(1, len(views)))
    fusion = settings.fusion.mode if patient_features else "none"  # nothing to fuse: say so in metrics too
    loss = settings.loss
    return {
        "model": canonical_name(settings.model.name), "params": params, "fusion": fusion, "in_dim": int(in_dim),
        "classes": list(classes), "views": list(views),
        "cbc_columns": list(patient_features) if fusion != "none" else [],
        "cbc_log_columns": [c for c in settings.data.log_features if c in patient_features],
        "standardize_features": settings.data.standardize_features,
        "tasks": list(loss.task),
        # Bin edges of a discrete-time head are added from the training patients (train_model).
        "survival": {"kind": loss.survival, "bins": loss.survival_bins} if loss.has_survival else None,
    } | _eval_subsample(settings)


def _eval_subsample(settings: Settings) -> dict[str, Any]:
    """The spec's ``eval_subsample`` entry, present only when it is on (older specs stay as they were)."""
    draws = settings.data.eval_subsample
    return {"eval_subsample": {"draws": draws, "cells": settings.data.max_cells}} if draws > 0 else {}


def build_model(spec: Mapping[str, Any]) -> PatientModel:
    """A fresh (unfitted) :class:`PatientModel` from :func:`model_spec`'s output."""
    cbc_columns = spec["cbc_columns"]
    encoder = CBCEncoder(cbc_columns, spec["cbc_log_columns"]) if cbc_columns else None
    mil = create_model(spec["model"], in_dim=spec["in_dim"], n_classes=len(spec["classes"]),
                       cbc_dim=encoder.out_dim if encoder else 0, fusion=spec["fusion"] if encoder else "none",
                       **spec["params"])
    survival = None
    if spec.get("survival"):
        survival = SurvivalHead(spec["survival"]["kind"], _embedding_dim(mil, spec["in_dim"], encoder),
                                spec["survival"].get("edges"))
    return PatientModel(mil, FeatureNorm(spec["in_dim"], spec["standardize_features"]), encoder, survival, spec)


@torch.no_grad()
def _embedding_dim(mil: MILModel, in_dim: int, encoder: CBCEncoder | None) -> int:
    """Width of the model's bag embedding, from one forward pass on a dummy two-cell bag."""
    mil.eval()
    x = torch.zeros(1, 2, in_dim)
    cbc = torch.zeros(1, encoder.out_dim) if encoder is not None else None
    out = mil(x, torch.ones(1, 2, dtype=torch.bool), cbc=cbc, coords=torch.zeros(1, 2, 2),
              view=torch.zeros(1, 2, dtype=torch.long))
    mil.train()
    return int(out.embedding.shape[-1])


def check_inputs(spec: Mapping[str, Any], info: BagInfo, ids: Sequence[str]) -> None:
    """Refuse patients the model has nothing to read from: no cell and no patient-level input.

    A patient without cells is predicted from its patient features (the CBC) alone; a model
    that reads none of them (``data.patient_features: []`` or ``fusion.mode: none``) cannot.
    """
    if spec["cbc_columns"]:
        return
    empty = [p for p in ids if info.n_cells.get(p, 1) == 0]
    if empty:
        who = f"patient {empty[0]} has" if len(empty) == 1 else f"patients {empty[0]} and {len(empty) - 1} more have"
        raise MilhemaError(f"{who} no cell, and the model reads no patient feature (data.patient_features is "
                           "empty or fusion.mode is none): give them slides, remove them from patients.csv, or "
                           "fuse their CBC")
