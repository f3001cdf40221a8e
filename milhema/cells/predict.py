"""``milhema cells predict``: a cell classifier's probabilities written into the bags (format version 2).

Nothing is re-embedded: each bag's features go through the classifier and the probabilities are
added to the bag atomically (:func:`milhema.bags.add_cell_predictions`). A slide of a patient the
run held out in a fold, with the same cells and features as then, is predicted by that fold's
model (its out-of-fold prediction, so a training patient's differential does not come from a
model that learnt its annotations); any other slide by the mean of the fold models. A bag that
already carries this classifier's predictions is skipped (so an interrupted call resumes); one
carrying another classifier's is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from milhema.bags import (
    CLASSIFIER_ATTR,
    FORMAT,
    CellPredictions,
    add_cell_predictions,
    read_bag,
    read_bag_attrs,
)
from milhema.cells.annotations import BagSource, bag_source, slide_signature
from milhema.cells.model import (
    CLASSIFIER_FILE,
    RUN_FORMAT,
    CellClassifier,
    CellClassifierError,
    load_classifier,
)
from milhema.data.manifest import Cohort
from milhema.device import resolve_device
from milhema.errors import BagError, MilhemaError


@dataclass
class CellRun:
    """A ``cells train`` run folder loaded: its fold models and what they were trained on."""

    path: Path
    fingerprint: str
    types: tuple[str, ...]
    attributes: tuple[str, ...]
    neutrophil_types: tuple[str, ...]
    source: BagSource
    models: list[tuple[CellClassifier, dict[str, Any]]]

    def model_for(self, slide_id: str, signature: str) -> tuple[list[CellClassifier], str]:
        """The models that predict a slide (its held-out fold's, else all) and how the bag records that."""
        for model, meta in self.models:
            if meta.get("test_slides", {}).get(slide_id) == signature:
                return [model], f"fold {meta['fold']} (this slide's patient was held out of its training)"
        return [m for m, _ in self.models], f"mean of the {len(self.models)} fold models"


def load_cell_run(run: str | Path) -> CellRun:
    """The fold models of a ``cells train`` run folder.

    Raises:
        MilhemaError: not such a run folder, or a damaged or altered classifier file.
    """
    run = Path(run)
    path = run / CLASSIFIER_FILE
    if not path.is_file():
        raise MilhemaError(f"{run} is not a milhema cells run folder (no {CLASSIFIER_FILE}); pass the --out of "
                           "milhema cells train")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        folds = [run / str(f["file"]) for f in doc["folds"]]
        if doc.get("format") != RUN_FORMAT or not folds:
            raise ValueError("not a cell classifier run")
        BagSource.from_dict(doc["source"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CellClassifierError(f"{path}: unreadable ({type(exc).__name__}); restore it from the run, or train "
                                  "again") from exc
    models = [load_classifier(stem) for stem in folds]
    if [m["weights_sha256"] for _, m in models] != [f.get("weights_sha256") for f in doc["folds"]]:
        raise CellClassifierError(f"{path}: its fold models are not the ones it lists; restore the run folder")
    return CellRun(run, str(doc["fingerprint"]), tuple(doc["types"]), tuple(doc["attributes"]),
                   tuple(doc.get("neutrophil_types", [])), BagSource.from_dict(doc["source"]), models)


@dataclass
class PredictReport:
    """What ``cells predict`` did: bags written, already done, cells predicted."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cells: int = 0
    held_out: int = 0   # slides predicted by the fold model that held their patient out


def bag_paths(bags: Path | None, cohort: Cohort | None) -> list[Path]:
    """The bags to predict: the cohort's slides' bags, or every ``*.h5`` of the ``bags`` folder."""
    if cohort is not None:
        return [slide.bag_path(bags) for slide in cohort.slides]
    if bags is None or not bags.is_dir():
        raise MilhemaError(f"bag folder {bags} does not exist (the --out of milhema embed)")
    paths = sorted(p for p in bags.glob("*.h5") if not p.name.startswith("."))
    if not paths:
        raise MilhemaError(f"no bag (*.h5) in {bags}")
    return paths


def run_cells_predict(run: str | Path, bags: str | Path | None, cohort: Cohort | None = None, *,
                      overwrite: bool = False, device: str = "auto", progress: bool = True) -> PredictReport:
    """Add the classifier of ``run`` to every bag (of ``cohort``'s slides, or of the ``bags`` folder).

    Raises:
        MilhemaError: a missing bag, bags made with other features than the classifier's, or bags
            with another classifier's predictions (without ``overwrite``); checked before any bag is written.
    """
    loaded = load_cell_run(run)
    paths = bag_paths(None if bags is None else Path(bags), cohort)
    for path in paths:
        _check_bag(path, loaded, overwrite)
    torch_device = resolve_device(device)
    report = PredictReport()
    for path in tqdm(paths, desc="cells predict", unit="bag", disable=None if progress else True):
        if read_bag_attrs(path).get(CLASSIFIER_ATTR) == loaded.fingerprint:
            report.skipped.append(path.stem)
            continue
        bag = read_bag(path, thumbnails=False)
        models, how = loaded.model_for(bag.slide_id, slide_signature(bag))
        x = bag.features if loaded.source.columns is None else bag.features[:, list(loaded.source.columns)]
        types, attributes = mean_probabilities(models, x, torch_device)
        info = {"run": str(loaded.path.resolve().name), "model": how, "neutrophil_types": list(loaded.neutrophil_types)}
        add_cell_predictions(path, CellPredictions(types, loaded.types, loaded.fingerprint, attributes,
                                                   loaded.attributes if attributes is not None else (),
                                                   json.dumps(info)))
        report.written.append(bag.slide_id)
        report.cells += bag.n_cells
        report.held_out += int(len(models) == 1 and len(loaded.models) > 1)
    return report


def _check_bag(path: Path, loaded: CellRun, overwrite: bool) -> None:
    """Refuse a bag the classifier cannot read, or another classifier's predictions without ``overwrite``."""
    if not path.is_file():
        raise BagError(f"slide {path.stem}: no bag file {path} (run milhema embed first)")
    attrs = read_bag_attrs(path)
    if attrs.get("format") != FORMAT:
        raise BagError(f"slide {attrs['slide_id']}: {path.name} is a feature file not written by milhema embed; cell "
                       "predictions are only added to milhema bags")
    check_features(attrs, int(attrs["feature_dim"]), str(attrs["slide_id"]), loaded)
    earlier = attrs.get(CLASSIFIER_ATTR)
    if earlier not in (None, loaded.fingerprint) and not overwrite:
        raise MilhemaError(f"slide {attrs['slide_id']}: its bag already carries the predictions of another cell "
                           f"classifier ({str(earlier)[:12]}); pass --overwrite to replace them with {loaded.path.name}'s")


def check_features(attrs: dict[str, Any], feature_dim: int, slide_id: str, loaded: CellRun) -> None:
    """Refuse a bag (root attributes ``attrs``, ``feature_dim`` columns) whose features are not the ones the
    classifier of ``loaded`` was trained on."""
    trained = loaded.source
    here = bag_source(attrs, feature_dim, trained.blocks, slide_id)
    if here != trained:
        raise MilhemaError(f"slide {slide_id}: bag made with {here.backbone} ({here.feature_dim} features"
                           f"{'' if here.weights_sha256 == trained.weights_sha256 else ', other weights'}) but the cell "
                           f"classifier in {loaded.path} was trained on {trained.backbone} ({trained.feature_dim}); "
                           "embed with the same backbone and options")


def mean_probabilities(models: list[CellClassifier], features: np.ndarray,
                       device: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    """The mean over ``models`` of the calibrated type probabilities ``[N, T]`` and attribute probabilities
    ``[N, A]`` (or None) of ``features [N, D]``."""
    types: np.ndarray | None = None
    attributes: np.ndarray | None = None
    for model in models:
        t, a = model.probabilities(features, device)
        types = t if types is None else types + t
        if a is not None:
            attributes = a if attributes is None else attributes + a
    assert types is not None
    n = len(models)
    return (types / n).astype(np.float32), None if attributes is None else (attributes / n).astype(np.float32)
