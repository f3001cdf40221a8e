"""``milhema train``, and the run-folder plumbing it shares with ``milhema cv`` (:mod:`milhema.train.cv`).

A run is written into a hidden sibling folder and renamed when complete, so a crashed run
never looks finished. :func:`open_run` builds that folder with its W&B run and ``config.yaml``;
:func:`prepare` reads what every run trains on; :func:`train_model` fits one model.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from milhema.config import dump_config
from milhema.data.manifest import Cohort
from milhema.device import resolve_device
from milhema.differential import with_differential
from milhema.errors import MilhemaError
from milhema.io import atomic_folder, check_new_folder, write_text
from milhema.settings import Settings
from milhema.tracking import Tracker, start_tracker
from milhema.train import distributed
from milhema.train.baseline import BASELINE_FILE, cbc_design, fit_cbc_baseline
from milhema.train.calibration import fit_temperature
from milhema.train.checkpoint import save_checkpoint
from milhema.train.data import BagInfo, BagStore, check_views, inspect_bags, resolve_views
from milhema.train.distributed import Ranks
from milhema.train.inference import predict
from milhema.train.loop import fit
from milhema.train.metrics import classification_metrics
from milhema.train.model import PatientModel, build_model, check_inputs, model_spec
from milhema.train.survival import concordance_summary, time_bin_edges

T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """What a run trains on: the bags, their description, the model spec and the usable patients.

    ``ids`` are the labelled patients (or, for survival alone, the followed ones) in cohort order.
    ``cohort`` is the cohort with its bag-derived patient features (``diff_*``, ``anomaly_*``) filled
    in, and ``cell_classifier`` the fingerprint of the cell classifier they come from (None without).
    """

    store: BagStore
    info: BagInfo
    spec: dict[str, Any]
    ids: list[str]
    cohort: Cohort
    cell_classifier: str | None = None


@dataclass(frozen=True)
class RunFolder:
    """A run folder being written: ``path`` now, renamed to ``out`` when complete; its W&B ``tracker``."""

    path: Path
    out: Path
    tracker: Tracker


def prepare(settings: Settings, cohort: Cohort, bags: Path | None) -> Prepared:
    """Bags, model spec and the patients the task can learn from (labelled; or followed, for survival only)."""
    loss = settings.loss
    if loss.has_classification:
        ids = [p for p in cohort.patient_ids if cohort.patients[p].label is not None]
        if not ids:
            raise MilhemaError("no patient has a label: training needs labels in patients.csv")
    else:
        ids = [p for p in cohort.patient_ids if cohort.patients[p].time is not None]
    if loss.has_survival:
        followed = [p for p in ids if cohort.patients[p].time is not None]
        events = sum(int(cohort.patients[p].event or 0) for p in followed)
        if len(followed) < 4 or events < 2:
            raise MilhemaError(f"survival needs follow-up: {len(followed)} patients have time/event in "
                               f"patients.csv and {events} had the event (at least 4 and 2)")
    info = inspect_bags(cohort, bags, ids, settings.data.feature_blocks)
    # The predicted differential as patient features, from the bags (a cell classifier trained on cell
    # annotations, never on these labels): computed here, before any split.
    cohort, cell_classifier = with_differential(cohort, bags, ids)
    views = resolve_views(cohort, settings.data.views)
    store = BagStore(cohort, bags, views, cache=settings.data.cache, columns=info.columns, n_cells=info.n_cells,
                     feature_dim=info.feature_dim, checked=True)
    spec = model_spec(settings, info.feature_dim, cohort.classes, cohort.patient_features, views)
    if "n_views" in spec["params"]:  # a model that tells views apart must know every slide's view
        check_views(cohort, ids, views)
    check_inputs(spec, info, ids)
    return Prepared(store, info, spec, ids, cohort, cell_classifier)


def fold_seed(seed: int, repeat: int, fold: int) -> int:
    """The seed of one cv fold, derived from ``(train.seed, repeat, fold)``: folds and repeats start
    from different initial weights, so the spread over repeats includes initialisation."""
    return int(np.random.SeedSequence([seed, repeat, fold]).generate_state(1)[0])


def inner_split(ids: Sequence[str], y: np.ndarray, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Stratified validation split of the training patients (unstratified if a class is too small).

    ``fraction`` 0 keeps every patient for training (no validation split: no early stopping, no
    temperature scaling).
    """
    if fraction == 0:
        return list(ids), []
    try:
        train, val = train_test_split(list(ids), test_size=fraction, stratify=y, random_state=seed)
    except ValueError:
        train, val = train_test_split(list(ids), test_size=fraction, random_state=seed)
    return list(train), list(val)


def event_strata(event: np.ndarray, folds: int) -> np.ndarray:
    """Strata for survival-only splits: event vs censored/unfollowed, or one group if either is too rare."""
    strata = np.nan_to_num(event, nan=0.0).astype(np.int64)
    return strata if np.bincount(strata, minlength=2).min() >= folds else np.zeros_like(strata)


def train_model(settings: Settings, store: BagStore, spec: Mapping[str, Any], train_ids: Sequence[str],
                val_ids: Sequence[str], device: torch.device, log: Callable[[dict[str, Any]], None] | None,
                progress: bool, desc: str, ranks: Ranks | None = None,
                seed: int | None = None) -> tuple[PatientModel, list[dict[str, Any]]]:
    """Fit preprocessing on the training patients, then train with early stopping on ``val_ids``.

    ``seed`` (default ``train.seed``) draws the initial weights and everything random in training;
    cv gives each fold its own (:func:`fold_seed`).
    """
    seed = settings.train.seed if seed is None else seed
    train_bags, val_bags = store.many(train_ids), store.many(val_ids)
    survival = spec.get("survival")
    if survival and survival["kind"] == "discrete":
        # Bins from the training patients only; stored in the spec, so the checkpoint rebuilds them.
        edges = time_bin_edges(train_bags.times, train_bags.events, survival["bins"])
        spec = {**spec, "survival": {**survival, "edges": edges}}
    torch.manual_seed(seed)  # initial weights: same seed, same run
    model = build_model(spec)
    model.feature_norm.fit(b.features for b in train_bags)
    if model.cbc_encoder is not None:
        model.cbc_encoder.fit(np.stack([b.cbc for b in train_bags]))
    history = fit(model, train_bags, val_bags, settings, device=device, log=log, progress=progress, desc=desc,
                  ranks=ranks, seed=seed)
    if settings.loss.has_classification and len(val_bags):
        # Calibrated on the split that chose the epoch, never on a test patient (Guo et al. 2017).
        val = predict(model, val_bags, settings.train.batch_size, device=device, ranks=ranks)
        model.temperature = fit_temperature(val.probs, val_bags.labels)
    return model, history


def start_devices(settings: Settings) -> tuple[torch.device, Ranks]:
    """The training device and, under torchrun, this process's place in the process group."""
    device = resolve_device(settings.train.device)
    ranks = distributed.init_from_env(device)
    return distributed.rank_device(device, ranks), ranks


@contextmanager
def open_run(settings: Settings, out: Path, ranks: Ranks, job_type: str, *,
             bookkeeping: Callable[[Path], AbstractContextManager[T]], **atomic: Any) -> Iterator[tuple[RunFolder, T]]:
    """The run folder being written, its W&B run and ``config.yaml``; ``atomic`` goes to :func:`atomic_folder`.

    ``bookkeeping(path)`` (cv's record of finished folds; ``nullcontext`` for none) is entered after
    the folder and before the tracker, so it may clear what a killed run left there, and is closed
    after the tracker; the W&B run is closed (its files complete) before the folder gets its final name.
    """
    with ExitStack() as stack:
        path = stack.enter_context(_folder(out, ranks, **atomic))
        kept = stack.enter_context(bookkeeping(path))
        tracker = stack.enter_context(_tracker(settings, path, out, job_type, ranks))
        write_text(path / "config.yaml", dump_config(settings))
        yield RunFolder(path, out, tracker), kept


@contextmanager
def _folder(out: Path, ranks: Ranks, **atomic: Any) -> Iterator[Path]:
    """The folder this process writes the run into.

    Rank 0 builds the real run folder, renamed into place when complete. The other ranks of a
    torchrun job compute the same results in lockstep and write them into a scratch folder that
    is deleted, so a run has exactly one folder.
    """
    if ranks.is_main:
        with atomic_folder(out, what="run folder", **atomic) as tmp:
            yield tmp
        return
    # Every rank refuses an existing folder, so none is left waiting for the others.
    check_new_folder(out, overwrite=atomic.get("overwrite", False), what="run folder",
                     hint=atomic.get("hint", "choose another folder or pass --overwrite"))
    with tempfile.TemporaryDirectory(prefix=f"milhema-rank{ranks.rank}-") as scratch:
        yield Path(scratch)


def _tracker(settings: Settings, folder: Path, out: Path, job_type: str, ranks: Ranks) -> Tracker:
    """The W&B run of rank 0 (one run per command); other ranks track nothing."""
    if not ranks.is_main:
        return Tracker()
    return start_tracker(settings, folder, name=out.name, job_type=job_type, final_folder=out)


def history_writer(path: Path, tracker: Tracker, prefix: str = "", **keys: Any) -> Callable[[dict[str, Any]], None]:
    """Per-epoch callback: one line of ``history.jsonl`` (with ``keys``) and the same record to the tracker."""
    def log(record: dict[str, Any]) -> None:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({**keys, **record}) + "\n")
        tracker.log_epoch(record, prefix)
    return log


def bag_meta(info: BagInfo, cell_classifier: str | None = None) -> dict[str, Any]:
    """What a checkpoint records of the bags it was trained on (checked by ``predict``), with the cell
    classifier whose predicted differential it reads, if any."""
    meta = {"backbone": info.backbone, "weights_sha256": info.weights_sha256, "feature_dim": info.feature_dim,
            "columns": None if info.columns is None else list(info.columns)}
    return meta | ({"cell_classifier_sha256": cell_classifier} if cell_classifier else {})


def metrics_header(settings: Settings, spec: Mapping[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """The first keys of every metrics.json: task, classes, model and fusion."""
    return {"task": settings.loss.task_name, "classes": list(classes), "model": spec["model"], "fusion": spec["fusion"]}


def save_cbc_baseline(run: RunFolder, settings: Settings, cohort: Cohort, ids: Sequence[str]) -> None:
    """The CBC-only model fitted on all of the run's labelled patients, for ``predict`` to apply to a
    new cohort beside the MIL model (nothing is written without labels or patient features)."""
    labelled = [p for p in ids if cohort.patients[p].label is not None]
    y = cohort.labels(labelled)
    if not settings.loss.has_classification or not cohort.patient_features or len(set(y.tolist())) < 2:
        return
    x = cbc_design(cohort, labelled, settings.data.log_features)
    params = fit_cbc_baseline(x, y, cohort.classes, cohort.patient_features, settings.data.log_features,
                              settings.train.seed)
    write_text(run.path / BASELINE_FILE, json.dumps(params, indent=2) + "\n")


def publish(run: RunFolder, metrics: Mapping[str, Any], table: str, ids: Sequence[str],
            labels: Sequence[str | None], probs: np.ndarray, classes: Sequence[str],
            plots: Mapping[str, tuple[np.ndarray, np.ndarray]], extra: Mapping[str, Sequence[Any]] | None = None) -> None:
    """Write metrics.json; send the metrics, ``plots`` (key -> labels, probabilities), the predictions
    ``table`` and the checkpoints to the tracker."""
    write_text(run.path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    run.tracker.log_summary(metrics)
    for key, (y, plot_probs) in plots.items():
        run.tracker.log_classification_plots(key, y, plot_probs, classes)
    if len(ids):
        run.tracker.log_predictions(table, ids, "patient", labels, probs, classes, extra)
    run.tracker.log_checkpoints(run.path / "checkpoints", run.out.name)


# What `train` can and cannot say about its model: it has no held-out patients.
EARLY_STOPPING_NOTE = ("the metrics are on the validation patients that chose the stopping epoch: optimistic, not a test "
                       "set; milhema cv estimates how the model does on new patients")
NO_VALIDATION_NOTE = ("train.val_fraction is 0: every patient trained the model for train.epochs epochs, none was held "
                      "out, so there are no metrics and no temperature scaling; milhema cv estimates how the model does "
                      "on new patients")


def run_train(settings: Settings, cohort: Cohort, bags: str | Path | None, out: str | Path, *,
              overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """One model on all labelled patients, early-stopped on an inner validation split (none if
    ``train.val_fraction`` is 0: then it trains for ``train.epochs`` epochs)."""
    out = Path(out)
    bags = None if bags is None else Path(bags)
    check_new_folder(out, overwrite=overwrite, what="run folder")
    prep = prepare(settings, cohort, bags)
    cohort = prep.cohort
    loss, t = settings.loss, settings.train
    _, event = cohort.follow_up(prep.ids)
    strata = cohort.labels(prep.ids) if loss.has_classification else event_strata(event, 2)
    device, ranks = start_devices(settings)
    with open_run(settings, out, ranks, "train", bookkeeping=lambda _: nullcontext(), overwrite=overwrite) as (run, _):
        train_ids, val_ids = inner_split(prep.ids, strata, t.val_fraction, t.seed)
        model, history = train_model(settings, prep.store, prep.spec, train_ids, val_ids, device,
                                     history_writer(run.path / "history.jsonl", run.tracker),
                                     progress and ranks.is_main, desc=f"train {prep.spec['model']}", ranks=ranks)
        save_checkpoint(run.path / "checkpoints" / "model", model, model.spec,
                        {"bags": bag_meta(prep.info, prep.cell_classifier), "test_patients": [], "train_patients": train_ids,
                         "val_patients": val_ids})
        metrics = {**metrics_header(settings, prep.spec, cohort.classes),
                   "note": EARLY_STOPPING_NOTE if val_ids else NO_VALIDATION_NOTE,
                   "n_patients": len(prep.ids), "n_train": len(train_ids), "n_val": len(val_ids),
                   "epochs_run": len(history), "temperature": model.temperature,
                   "backbone": prep.info.backbone, "feature_dim": prep.info.feature_dim,
                   "processes": ranks.world}
        save_cbc_baseline(run, settings, cohort, prep.ids)
        probs, plots = np.zeros((0, len(cohort.classes))), {}
        if val_ids:
            val = predict(model, prep.store.many(val_ids), t.batch_size, device=device, ranks=ranks)
            val_y, probs = cohort.labels(val_ids), val.probs
            if loss.has_classification:
                metrics["early_stopping_split"] = classification_metrics(val_y, probs, cohort.classes)
                plots = {"early_stopping_split": (val_y, probs)}
            if loss.has_survival and val.risk is not None:
                vt, ve = cohort.follow_up(val_ids)
                metrics["early_stopping_split_survival"] = {"c_index": concordance_summary(vt, ve, val.risk, seed=t.seed)}
        publish(run, metrics, "validation_predictions", val_ids, [cohort.patients[p].label for p in val_ids],
                probs, cohort.classes, plots)
    return metrics
