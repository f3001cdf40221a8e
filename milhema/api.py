"""The notebook API: a finished run as an object that predicts patients from their bag files.

    import milhema
    run = milhema.load_run("runs/abmil")
    result = run.predict_bags(["S1.h5", "S2.h5"], cbc={"wbc": 48.0, "hb": 8.1})
    result.pred, result.probabilities, result.cells        # cells: a pandas DataFrame
    png = result.gallery(top_k=16)

No manifest, no cohort object and no torch device to handle: the bag files of one patient (from
``milhema embed``, or feature files made elsewhere) and the patient's features (CBC) by name.
A cv run predicts with the ensemble of its fold models, as ``milhema predict --ensemble`` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from milhema.bags import Bag, read_bag, read_bag_attrs
from milhema.data.manifest import is_derived_feature
from milhema.device import resolve_device
from milhema.differential import patient_values, slide_predictions
from milhema.errors import MilhemaError
from milhema.explain import figures
from milhema.settings import Settings
from milhema.slides.wsi import WholeSlide
from milhema.train.checkpoint import CheckpointError, check_compatible, load_checkpoint
from milhema.train.data import BagInfo, PatientBag, block_columns
from milhema.train.inference import predict_patients
from milhema.train.model import PatientModel
from milhema.train.outputs import rank_percentiles
from milhema.train.predict import run_settings


def load_run(path: str | Path, *, device: str = "auto") -> Run:
    """Load every checkpoint of the run folder ``path`` (of ``milhema train`` or ``milhema cv``).

    Raises:
        MilhemaError: not a run folder, or a damaged checkpoint.
    """
    path = Path(path)
    settings = run_settings(path)
    stems = sorted(p.with_suffix("") for p in (path / "checkpoints").glob("*.json"))
    if not stems:
        raise CheckpointError(f"{path}/checkpoints holds no checkpoint")
    return Run(path, settings, [load_checkpoint(stem) for stem in stems], resolve_device(device))


@dataclass
class Run:
    """A trained run: its settings, classes and models (one per cv fold and repeat, or one)."""

    path: Path
    settings: Settings
    models: list[tuple[PatientModel, dict[str, Any]]]
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return list(self.models[0][1]["spec"]["classes"])

    @property
    def patient_features(self) -> list[str]:
        """The patient features (CBC ...) the models read, by name: the keys ``cbc=`` takes."""
        return list(self.models[0][1]["spec"]["cbc_columns"])

    def predict_bag(self, bag: str | Path, *, cbc: Mapping[str, float] | None = None,
                    patient_id: str = "patient") -> PatientResult:
        """:meth:`predict_bags` for a patient with one slide."""
        return self.predict_bags([bag], cbc=cbc, patient_id=patient_id)

    def predict_bags(self, bags: Sequence[str | Path], *, cbc: Mapping[str, float] | None = None,
                     patient_id: str = "patient") -> PatientResult:
        """Predict one patient from the bag files of its slides and its patient features.

        Args:
            bags: the patient's bag files (``.h5``), one per slide; none for a CBC-only patient.
            cbc: patient features by name (``{"wbc": 48.0, ...}``); a feature the models read
                that is absent or NaN is missing, as an empty cell of patients.csv.

        Raises:
            MilhemaError: a bag made with another backbone than the run's, a name in ``cbc``
                that the models do not read, or nothing to predict from.
        """
        unknown = sorted(set(cbc or {}) - set(self.patient_features))
        if unknown:
            raise MilhemaError(f"cbc names {', '.join(unknown)}, which the run's models do not read "
                               f"(they read {', '.join(self.patient_features) or 'no patient feature'})")
        bag, extras = self._patient_bag([Path(b) for b in bags], cbc or {}, patient_id)
        if bag.n_cells == 0 and not self.patient_features:
            raise MilhemaError(f"{patient_id}: no cell in its bags, and the run's models read no patient feature")
        probs, scores, slides = np.zeros(len(self.classes)), np.zeros(bag.n_cells), np.zeros((len(bag.slide_ids),
                                                                                             len(self.classes)))
        class_scores: np.ndarray | None = None
        risks: list[float] = []
        for model, _ in self.models:
            result = predict_patients(model, [bag], self.settings.train.batch_size, self.device)
            patient = result.patient
            probs, scores, slides = probs + patient.probs[0], scores + patient.cell_scores[0], slides + result.slide.probs
            per_class = patient.class_cell_scores[0]
            if per_class is not None:
                class_scores = per_class if class_scores is None else class_scores + per_class
            if patient.risk is not None and not math.isnan(patient.risk[0]):
                risks.append(float(patient.risk[0]))
        n = len(self.models)
        return PatientResult(patient_id, self.classes, probs / n, scores / n,
                             None if class_scores is None else class_scores / n,
                             float(np.mean(risks)) if risks else None, n, bag, extras,
                             dict(zip(bag.slide_ids, slides / n, strict=True)))

    def _patient_bag(self, paths: list[Path], cbc: Mapping[str, float],
                     patient_id: str) -> tuple[PatientBag, dict[str, Any]]:
        """The cells of ``paths`` as one patient bag, checked against the run's bags."""
        meta = self.models[0][1]
        trained = meta["bags"]
        feature_blocks = self.settings.data.feature_blocks
        parts = []
        for path in paths:
            attrs = read_bag_attrs(path)
            columns = block_columns(attrs, feature_blocks, f"bag {path.name}")
            info = BagInfo(str(attrs.get("backbone", "unknown")), str(attrs.get("weights_sha256", "none")),
                           len(columns) if columns is not None else int(attrs["feature_dim"]), columns)
            for _, m in self.models:
                check_compatible(m, info, f"{self.path.name} (bag {path.name})")
            bag = read_bag(path, thumbnails=True)
            if columns is not None:
                bag.features = bag.features[:, list(columns)]
            parts.append(bag)
        dim = int(trained["feature_dim"])
        cbc = {**self._derived(parts, trained), **cbc}
        values = np.array([float(cbc.get(c, math.nan)) for c in self.patient_features], np.float32)

        def cat(items: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
            return np.concatenate(items) if items else empty

        patient = PatientBag(
            patient_id=patient_id, label=-1,
            features=cat([b.features for b in parts], np.zeros((0, dim), np.float32)),
            slide_index=cat([np.full(b.n_cells, i, np.int64) for i, b in enumerate(parts)], np.zeros(0, np.int64)),
            view_index=np.zeros(sum(b.n_cells for b in parts), np.int64),
            coords=cat([b.coords.astype(np.float32) for b in parts], np.zeros((0, 2), np.float32)),
            cell_ids=cat([np.asarray(b.cell_ids, object) for b in parts], np.zeros(0, object)),
            slide_ids=[b.slide_id for b in parts], cbc=values)
        extras = {
            "cell_types": (cat([np.asarray(b.cell_types, object) if b.cell_types is not None
                                else np.full(b.n_cells, "", object) for b in parts], np.zeros(0, object))
                           if any(b.cell_types is not None for b in parts) else None),
            "thumbnails": (np.concatenate([b.thumbnails for b in parts])
                           if parts and all(b.thumbnails is not None for b in parts) else None),
        }
        return patient, extras


    def _derived(self, parts: list[Bag], trained: Mapping[str, Any]) -> dict[str, float]:
        """The run's bag-derived patient features (``diff_*``, ``anomaly_*``) computed from the bags' predictions."""
        wanted = [c for c in self.patient_features if is_derived_feature(c)]
        if not wanted or not parts:
            return {}
        slides = []
        for bag in parts:
            if bag.predictions is None:
                raise MilhemaError(f"bag {bag.slide_id}: no cell_type_probs, which the run's patient features "
                                   f"{', '.join(wanted)} need; run milhema cells predict on it first")
            if trained.get("cell_classifier_sha256") not in (None, bag.predictions.classifier_sha256):
                raise MilhemaError(f"bag {bag.slide_id}: predicted by another cell classifier than the run read "
                                   f"({bag.predictions.classifier_sha256[:12]}, not "
                                   f"{trained['cell_classifier_sha256'][:12]})")
            slides.append(slide_predictions(bag.slide_id, "patient", bag.predictions))
        values = patient_values(slides)
        return {c: values.get(c, math.nan) for c in wanted}


@dataclass
class PatientResult:
    """One patient's prediction, its cells' scores, and the figures ``milhema explain`` draws.

    ``scores`` are ``[N]`` attention scores over the patient's cells (all slides, in bag order);
    ``class_scores`` ``[N, K]`` for models with class branches, else None.
    """

    patient_id: str
    classes: list[str]
    probs: np.ndarray
    scores: np.ndarray
    class_scores: np.ndarray | None
    risk: float | None
    n_models: int
    bag: PatientBag = field(repr=False)
    extras: dict[str, Any] = field(repr=False)
    slide_probs: dict[str, np.ndarray] = field(repr=False)

    @property
    def pred(self) -> str:
        """The predicted class."""
        return self.classes[int(np.argmax(self.probs))]

    @property
    def probabilities(self) -> dict[str, float]:
        """Class -> probability (mean over the run's models)."""
        return {c: float(p) for c, p in zip(self.classes, self.probs, strict=True)}

    @property
    def cells(self) -> pd.DataFrame:
        """One row per cell: slide_id, cell_id, x, y (level-0 px; NaN for crops), cell_type, score,
        rank_pct (100 = most attended) and ``score_<class>`` where the model has class branches."""
        bag = self.bag
        table: dict[str, Any] = {
            "slide_id": [bag.slide_ids[i] for i in bag.slide_index], "cell_id": list(bag.cell_ids),
            "x": bag.coords[:, 0], "y": bag.coords[:, 1],
            "cell_type": self.extras["cell_types"] if self.extras["cell_types"] is not None else [""] * bag.n_cells,
            "score": self.scores, "rank_pct": rank_percentiles(self.scores),
        }
        if self.class_scores is not None:
            table |= {f"score_{c}": self.class_scores[:, k] for k, c in enumerate(self.classes)}
        return pd.DataFrame(table)

    def gallery(self, top_k: int = 16, path: str | Path | None = None) -> bytes:
        """PNG of the ``top_k`` most and least attended cells (written to ``path`` too when given)."""
        png = figures.gallery(self.extras["thumbnails"], self.scores, self.extras["cell_types"], top_k,
                              f"{self.patient_id}: {self.pred} {self.probs.max():.2f}")
        return _saved(png, path)

    def heatmap(self, scan: str | Path, slide_id: str | None = None, *, mpp: float | None = None,
                path: str | Path | None = None) -> bytes:
        """PNG of the scan ``scan`` with the cells of its slide coloured by score percentile.

        ``slide_id`` picks the slide when the patient has several (default: the first).
        """
        slide_id = slide_id or self.bag.slide_ids[0]
        if slide_id not in self.bag.slide_ids:
            raise MilhemaError(f"{self.patient_id} has no slide {slide_id!r}; its slides: {', '.join(self.bag.slide_ids)}")
        sel = self.bag.slide_index == self.bag.slide_ids.index(slide_id)
        if not np.isfinite(self.bag.coords[sel]).all():
            raise MilhemaError(f"slide {slide_id}: its cells have no positions (a crop folder): use gallery() "
                               "or mosaic()")
        wsi = WholeSlide(slide_id, Path(scan), mpp)
        try:
            rgb, downsample = wsi.thumbnail(1024)
        finally:
            wsi.close()
        pct = rank_percentiles(self.scores)
        png = figures.slide_heatmap(rgb, downsample, self.bag.coords[sel], pct[sel],
                                    f"{self.patient_id} / {slide_id}: score percentile", top=16)
        return _saved(png, path)

    def mosaic(self, path: str | Path | None = None) -> bytes:
        """PNG of every cell (crops without positions) framed in its score-percentile colour."""
        png = figures.mosaic(self.extras["thumbnails"], self.scores, rank_percentiles(self.scores), self.patient_id)
        return _saved(png, path)


def _saved(png: bytes, path: str | Path | None) -> bytes:
    if path is not None:
        Path(path).write_bytes(png)
    return png
