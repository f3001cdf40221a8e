"""``milhema train`` and ``milhema cv``: run folders with metrics, predictions, scores, checkpoints.

A run is written into a hidden sibling folder and renamed when complete, so a crashed run
never looks finished.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from milhema.config import dump_config
from milhema.data.manifest import Cohort
from milhema.device import resolve_device
from milhema.errors import MilhemaError
from milhema.io import atomic_folder, check_new_folder, partial_folder
from milhema.tracking import Tracker, start_tracker
from milhema.train import distributed
from milhema.train.baseline import cbc_design, cross_val_proba, patient_folds
from milhema.train.checkpoint import load_checkpoint, save_checkpoint
from milhema.train.data import BagInfo, BagStore, PatientBag, inspect_bags, resolve_views
from milhema.train.distributed import Ranks
from milhema.train.loop import Prediction, fit, predict
from milhema.train.metrics import classification_metrics, summarise_repeats
from milhema.train.model import PatientModel, build_model, model_spec
from milhema.train.outputs import (
    prediction_header,
    prediction_rows,
    rank_percentiles,
    write_cell_scores,
    write_csv,
)
from milhema.train.resume import (
    RUN_HINT,
    CvProgress,
    FoldSplit,
    check_start,
    cohort_fingerprint,
    has_finished_folds,
    run_state,
)
from milhema.train.survival import (
    cbc_cox_risk,
    concordance_summary,
    kaplan_meier_plot,
    time_bin_edges,
)


@dataclass
class FoldResult:
    """Test-fold outputs of one model."""

    patient_ids: list[str]
    patient: Prediction
    slide_ids: list[str]
    slide_patient: list[str]
    slide: Prediction


def inner_split(ids: Sequence[str], y: np.ndarray, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Stratified validation split of the training patients (unstratified if a class is too small)."""
    try:
        train, val = train_test_split(list(ids), test_size=fraction, stratify=y, random_state=seed)
    except ValueError:
        train, val = train_test_split(list(ids), test_size=fraction, random_state=seed)
    return list(train), list(val)


def train_model(config: Mapping[str, Any], store: BagStore, spec: Mapping[str, Any], train_ids: Sequence[str],
                val_ids: Sequence[str], device: torch.device, log: Callable[[dict[str, Any]], None] | None,
                progress: bool, desc: str, ranks: Ranks | None = None) -> tuple[PatientModel, list[dict[str, Any]]]:
    """Fit preprocessing on the training patients, then train with early stopping on ``val_ids``."""
    train_bags, val_bags = store.many(train_ids), store.many(val_ids)
    if spec.get("survival") and spec["survival"]["kind"] == "discrete":
        # Bins from the training patients only; stored in the spec, so the checkpoint rebuilds them.
        edges = time_bin_edges(train_bags.times, train_bags.events, spec["survival"]["bins"])
        spec = {**spec, "survival": {**spec["survival"], "edges": edges}}
    torch.manual_seed(config["train"]["seed"])  # initial weights: same seed, same run
    model = build_model(spec)
    model.feature_norm.fit(b.features for b in train_bags)
    if model.cbc_encoder is not None:
        model.cbc_encoder.fit(np.stack([b.cbc for b in train_bags]))
    history = fit(model, train_bags, val_bags, config, device=device, log=log, progress=progress, desc=desc,
                  ranks=ranks)
    return model, history


def predict_patients(model: PatientModel, bags: Sequence[PatientBag], batch_size: int, device: torch.device,
                     amp: bool, ranks: Ranks | None = None) -> FoldResult:
    """Patient-bag and single-slide predictions of ``bags``."""
    slides = [(bag, i) for bag in bags for i in range(len(bag.slide_ids))]
    return FoldResult(
        patient_ids=[b.patient_id for b in bags],
        patient=predict(model, bags, batch_size, device=device, amp=amp, ranks=ranks),
        slide_ids=[bag.slide_ids[i] for bag, i in slides],
        slide_patient=[bag.patient_id for bag, _ in slides],
        slide=predict(model, [bag.slide(i) for bag, i in slides], batch_size, device=device, amp=amp, ranks=ranks),
    )


def _start(config: Mapping[str, Any]) -> tuple[torch.device, Ranks]:
    """The training device and, under torchrun, this process's place in the process group."""
    device = resolve_device(config["train"]["device"])
    ranks = distributed.init_from_env(device)
    return distributed.rank_device(device, ranks), ranks


@contextmanager
def _run_folder(out: Path, ranks: Ranks, **atomic: Any) -> Iterator[Path]:
    """The folder this process writes the run into (``atomic`` goes to :func:`atomic_folder`).

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


def _tracker(config: Mapping[str, Any], folder: Path, out: Path, job_type: str, ranks: Ranks) -> Tracker:
    """The W&B run of rank 0 (one run per command); other ranks track nothing."""
    if not ranks.is_main:
        return Tracker()
    return start_tracker(config, folder, name=out.name, job_type=job_type, final_folder=out)


def _share_reused(model: PatientModel | None, checkpoint: Path, ranks: Ranks) -> PatientModel | None:
    """Under torchrun with ``--resume``: rank 0's decision to reuse a finished fold, and its model, on every rank."""
    if not distributed.broadcast(model is not None, ranks):
        return None
    if model is None:
        model, _ = load_checkpoint(checkpoint)
    return model


def _prepare(config: Mapping[str, Any], cohort: Cohort, bags: Path) -> tuple[BagStore, BagInfo, dict[str, Any], list[str]]:
    """Bags, model spec and the patients the task can learn from (labelled; or followed, for survival only)."""
    tasks = config["loss"]["task"]
    if "classification" in tasks:
        ids = [p for p in cohort.patient_ids if cohort.patients[p].label is not None]
        if not ids:
            raise MilhemaError("no patient has a label: training needs labels in patients.csv")
    else:
        ids = [p for p in cohort.patient_ids if cohort.patients[p].time is not None]
    if "survival" in tasks:
        followed = [p for p in ids if cohort.patients[p].time is not None]
        events = sum(int(cohort.patients[p].event or 0) for p in followed)
        if len(followed) < 4 or events < 2:
            raise MilhemaError(f"survival needs follow-up: {len(followed)} patients have time/event in "
                               f"patients.csv and {events} had the event (at least 4 and 2)")
    info = inspect_bags(cohort, bags, ids, config["data"]["feature_blocks"])
    views = resolve_views(cohort, config["data"]["views"])
    store = BagStore(cohort, bags, views, cache=config["data"]["cache"], columns=info.columns,
                     n_cells=info.n_cells)
    spec = model_spec(config, info.feature_dim, cohort.classes, cohort.cbc_columns, views)
    return store, info, spec, ids


def _survival_metrics(time_: np.ndarray, event: np.ndarray, risk: np.ndarray, cbc_risk: np.ndarray,
                      folder: Path, seed: int) -> dict[str, Any]:
    """C-index (with bootstrap CI) of the out-of-fold risks per repeat, KM tertiles and the CBC Cox baseline.

    Risks of different fold models are not on one scale, so each fold's risks are turned into
    within-fold percentiles before the pooled c-index (a common, conservative choice).
    """
    model = _over_repeats(concordance_summary(time_, event, risk, seed=seed))
    cbc = _over_repeats(concordance_summary(time_, event, cbc_risk, seed=seed))
    p_value = kaplan_meier_plot(time_, event, risk[0], folder / "km_risk_groups.png")
    return {
        "c_index": model, "logrank_p": p_value,
        "risk_groups": "tertiles of out-of-fold risk (repeat 0); curves in km_risk_groups.png",
        "n_patients": model.pop("n"), "events": model.pop("events"),
        "baselines": {"cbc_cox": {"c_index": {k: v for k, v in cbc.items() if k not in ("n", "events")}}},
    }


def _over_repeats(summary: dict[str, Any]) -> dict[str, Any]:
    """A c-index summary with ``std`` (spread over repeats; None for one) and ``per_repeat`` always present."""
    values = summary.pop("per_repeat", [summary["mean"]])
    return {**summary, "std": float(np.std(values)) if len(values) > 1 else None, "per_repeat": values}


def _occlusion_scores(model: PatientModel, bag: PatientBag, target: int, device: torch.device) -> np.ndarray:
    """``[N]`` drop in the probability of class ``target`` (the predicted one) when each cell is left out."""
    from milhema.explain.scores import occlusion  # explain builds on train: imported when used

    drops = occlusion(model, bag, device)
    return drops[:, target] if drops.shape[0] else np.zeros(0)


def _faithfulness(scores: Mapping[str, Mapping[str, np.ndarray]],
                  truth: Mapping[str, np.ndarray | None]) -> dict[str, Any]:
    """``{"attention": {"diagnostic_auroc": …}, "occlusion": {…}}``: per-patient AUROC of out-of-fold
    cell scores against the cells' ``diagnostic`` truth (patients that have both kinds of cells)."""
    from milhema.explain.faithfulness import diagnostic_auroc

    return {method: {"diagnostic_auroc": diagnostic_auroc(per_patient, truth)}
            for method, per_patient in scores.items() if per_patient}


def _event_strata(event: np.ndarray, folds: int) -> np.ndarray:
    """Strata for survival-only splits: event vs censored/unfollowed, or one group if either is too rare."""
    strata = np.nan_to_num(event, nan=0.0).astype(np.int64)
    return strata if np.bincount(strata, minlength=2).min() >= folds else np.zeros_like(strata)


def _bag_meta(info: BagInfo) -> dict[str, Any]:
    return {"backbone": info.backbone, "weights_sha256": info.weights_sha256, "feature_dim": info.feature_dim,
            "columns": None if info.columns is None else list(info.columns)}


def _history_writer(path: Path, tracker: Tracker, prefix: str = "", **keys: Any) -> Callable[[dict[str, Any]], None]:
    """Per-epoch callback: one line of ``history.jsonl`` (with ``keys``) and the same record to the tracker."""
    def log(record: dict[str, Any]) -> None:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({**keys, **record}) + "\n")
        tracker.log_epoch(record, prefix)
    return log


def _reuse_fold(progress: CvProgress, split: FoldSplit, checkpoint: Path, tracker: Tracker) -> PatientModel | None:
    """The model of a fold the interrupted run finished; its epochs go to the (new) tracker run again."""
    found = progress.reuse(split, checkpoint)
    if found is None:
        return None
    model, history = found
    for record in history:
        tracker.log_epoch({k: v for k, v in record.items() if k not in ("repeat", "fold")}, split.name)
    return model


def run_cv(config: Mapping[str, Any], cohort: Cohort, bags: str | Path, out: str | Path, *, overwrite: bool = False,
           resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Patient-grouped, label-stratified K-fold cross-validation, repeated ``cv.repeats`` times.

    ``resume`` continues an interrupted run into ``out`` from its finished folds
    (:mod:`milhema.train.resume`), or returns the metrics of ``out`` if it is already complete.
    """
    bags, out = Path(bags), Path(out)
    finished = check_start(out, config, resume=resume, overwrite=overwrite)
    if finished is not None:
        return finished
    resuming = resume and run_state(out)[0] == "interrupted"
    folds, repeats = config["cv"]["folds"], config["cv"]["repeats"]
    store, info, spec, ids = _prepare(config, cohort, bags)
    y = cohort.labels(ids)
    tasks = config["loss"]["task"]
    classify = "classification" in tasks
    survive = "survival" in tasks
    time_, event = cohort.follow_up(ids)
    # Folds are stratified by label; for survival alone, by event (censored patients as one group).
    strata = y if classify else _event_strata(event, folds)
    device, ranks = _start(config)
    progress = progress and ranks.is_main
    t = config["train"]
    started = time.perf_counter()
    classes = cohort.classes
    # The W&B run is closed (its files complete) before the folder gets its final name.
    # An interrupted run beside a finished one was started with --overwrite: it replaces it.
    with (_run_folder(out, ranks, overwrite=overwrite or resuming, hint=RUN_HINT, reuse_partial=resuming,
                      keep_partial=has_finished_folds) as tmp,
          CvProgress.open(tmp, config, cohort_fingerprint(cohort, ids, bags, info),
                          resume=resuming and ranks.is_main) as folds_done,
          _tracker(config, tmp, out, "cv", ranks) as tracker):
        (tmp / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        patient_probs = np.zeros((repeats, len(ids), len(classes)))
        cbc_probs = np.zeros((repeats, len(ids), len(classes)))
        fold_of = np.zeros((repeats, len(ids)), int)
        patient_risk = np.full((repeats, len(ids)), np.nan)
        cbc_risk = np.full((repeats, len(ids)), np.nan)
        slide_records: list[tuple[str, str, int, int, np.ndarray]] = []
        faithful: dict[str, dict[str, np.ndarray]] = {"attention": {}, "occlusion": {}}
        truth: dict[str, np.ndarray | None] = {}
        position = {p: i for i, p in enumerate(ids)}
        cbc = cbc_design(cohort, ids, config["data"]["cbc_log_columns"])
        bar = tqdm(total=folds * repeats, desc=f"cv {spec['model']}", unit="fold", disable=None if progress else True)
        for r in range(repeats):
            splits = patient_folds(strata, folds, t["seed"] + r, classes if classify else ["censored", "event"])
            if classify:
                cbc_probs[r] = cross_val_proba(cbc, y, splits, len(classes), t["seed"])
            for k, (train_idx, test_idx) in enumerate(splits):
                train_ids = [ids[i] for i in train_idx]
                test_ids = [ids[i] for i in test_idx]
                inner_train, val = inner_split(train_ids, strata[train_idx], t["val_fraction"], t["seed"] + r)
                if set(test_ids) & (set(inner_train) | set(val)):
                    raise MilhemaError("internal check failed: a test patient is also in training")  # never expected
                split = FoldSplit(r, k, test_ids, inner_train, val)
                model = _reuse_fold(folds_done, split, tmp / "checkpoints" / split.name, tracker)
                if ranks.active:  # rank 0 alone keeps the interrupted run: the others follow its choice
                    shared = _share_reused(model, partial_folder(out) / "checkpoints" / split.name, ranks)
                    if shared is not None and model is None:
                        folds_done.begin(split)  # an empty history in this rank's scratch bookkeeping
                    model = shared
                if model is None:
                    log = _history_writer(folds_done.begin(split), tracker, split.name, repeat=r, fold=k)
                    model, _ = train_model(config, store, spec, inner_train, val, device, log, progress,
                                           desc=f"repeat {r} fold {k}", ranks=ranks)
                    save_checkpoint(tmp / "checkpoints" / split.name, model, model.spec,
                                    {"bags": _bag_meta(info), "repeat": r, "fold": k, "test_patients": test_ids,
                                     "train_patients": inner_train, "val_patients": val})
                    folds_done.finish(split)
                # Read once: the patient and slide predictions and the cell scores all use them.
                test_bags = list(store.many(test_ids))
                result = predict_patients(model, test_bags, t["batch_size"], device, t["amp"], ranks)
                for j, pid in enumerate(result.patient_ids):
                    patient_probs[r, position[pid]] = result.patient.probs[j]
                    fold_of[r, position[pid]] = k
                if survive and result.patient.risk is not None:
                    test_pos = [position[p] for p in result.patient_ids]
                    patient_risk[r, test_pos] = rank_percentiles(result.patient.risk) / 100.0
                    cbc_risk[r, test_idx] = rank_percentiles(
                        cbc_cox_risk(cbc[train_idx], time_[train_idx], event[train_idx], cbc[test_idx])) / 100.0
                slide_records += [(sid, result.slide_patient[j], r, k, result.slide.probs[j])
                                  for j, sid in enumerate(result.slide_ids)]
                if r == 0:
                    for j, bag in enumerate(test_bags):
                        write_cell_scores(tmp / "cell_scores", bag, result.patient.cell_scores[j],
                                          result.patient.class_cell_scores[j], classes)
                        truth[bag.patient_id] = bag.diagnostic
                        if bag.diagnostic is not None and classify:
                            faithful["attention"][bag.patient_id] = result.patient.cell_scores[j]
                            if j < -(-config["cv"]["occlusion_patients"] // folds):
                                target = int(result.patient.probs[j].argmax())
                                faithful["occlusion"][bag.patient_id] = _occlusion_scores(model, bag, target, device)
                bar.update(1)
        bar.close()
        labels = [cohort.patients[p].label for p in ids]
        rows = []
        for r in range(repeats):
            rows += prediction_rows(ids, labels, patient_probs[r], classes,
                                    [(int(fold_of[r, i]), r, *((f"{patient_risk[r, i]:.6f}",) if survive else ()))
                                     for i in range(len(ids))])
        write_csv(tmp / "predictions.csv", prediction_header("patient_id", classes,
                                                             ["fold", "repeat", *(["risk"] if survive else [])]), rows)
        write_csv(tmp / "slide_predictions.csv",
                  prediction_header("slide_id", classes, ["patient_id", "fold", "repeat"]),
                  [prediction_rows([sid], [cohort.patients[pid].label], prob[None], classes, [(pid, k, r)])[0]
                   for sid, pid, r, k, prob in slide_records])
        slide_metrics, from_slides = _slide_level(slide_records, ids, cohort, classes)
        metrics: dict[str, Any] = {
            "task": tasks[0] if len(tasks) == 1 else list(tasks), "classes": classes, "model": spec["model"],
            "fusion": spec["fusion"]}
        if classify:
            metrics |= {
                "patient": summarise_repeats(y, patient_probs, classes),
                "slide": slide_metrics,
                "patient_from_slides": from_slides,
                "baselines": {"cbc_only": {"patient": summarise_repeats(y, cbc_probs, classes)}},
            }
        if faithful["attention"]:
            metrics |= _faithfulness(faithful, truth)
        if survive:
            metrics["survival"] = _survival_metrics(time_, event, patient_risk, cbc_risk, tmp, t["seed"])
        metrics |= {
            "n_patients": len(ids), "n_slides": len({rec[0] for rec in slide_records}), "folds": folds, "repeats": repeats,
            "backbone": info.backbone, "feature_dim": info.feature_dim, "processes": ranks.world,
            "wall_time_s": round(time.perf_counter() - started, 1),
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        tracker.log_summary(metrics)
        if classify:
            tracker.log_classification_plots("patient", y, patient_probs.mean(axis=0), classes)
            tracker.log_classification_plots("baselines/cbc_only/patient", y, cbc_probs.mean(axis=0), classes)
        tracker.log_predictions("predictions", ids, "patient", labels, patient_probs.mean(axis=0), classes,
                                {"fold": fold_of[0].tolist()})
        tracker.log_checkpoints(tmp / "checkpoints", out.name)
    return metrics


def _slide_level(records: Sequence[tuple[str, str, int, int, np.ndarray]], ids: Sequence[str], cohort: Cohort,
                 classes: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of single-slide predictions, and of their per-patient average."""
    by_slide: dict[str, list[np.ndarray]] = {}
    patient_of: dict[str, str] = {}
    for sid, pid, _, _, prob in records:
        by_slide.setdefault(sid, []).append(prob)
        patient_of[sid] = pid
    slide_ids = list(by_slide)
    slide_probs = np.array([np.mean(by_slide[s], axis=0) for s in slide_ids])
    slide_y = cohort.labels([patient_of[s] for s in slide_ids])
    per_patient: dict[str, list[np.ndarray]] = {}
    for sid, prob in zip(slide_ids, slide_probs, strict=True):
        per_patient.setdefault(patient_of[sid], []).append(prob)
    with_slides = [p for p in ids if p in per_patient]
    averaged = np.array([np.mean(per_patient[p], axis=0) for p in with_slides])
    return (classification_metrics(slide_y, slide_probs, classes),
            classification_metrics(cohort.labels(with_slides), averaged, classes))


def run_train(config: Mapping[str, Any], cohort: Cohort, bags: str | Path, out: str | Path, *,
              overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """One model on all labelled patients, early-stopped on an inner validation split."""
    bags, out = Path(bags), Path(out)
    check_new_folder(out, overwrite=overwrite, what="run folder")
    store, info, spec, ids = _prepare(config, cohort, bags)
    tasks = config["loss"]["task"]
    y = cohort.labels(ids)
    time_, event = cohort.follow_up(ids)
    strata = y if "classification" in tasks else _event_strata(event, 2)
    t = config["train"]
    device, ranks = _start(config)
    progress = progress and ranks.is_main
    with (_run_folder(out, ranks, overwrite=overwrite) as tmp,
          _tracker(config, tmp, out, "train", ranks) as tracker):
        (tmp / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        train_ids, val_ids = inner_split(ids, strata, t["val_fraction"], t["seed"])
        model, history = train_model(config, store, spec, train_ids, val_ids, device,
                                     _history_writer(tmp / "history.jsonl", tracker), progress,
                                     desc=f"train {spec['model']}", ranks=ranks)
        save_checkpoint(tmp / "checkpoints" / "model", model, model.spec,
                        {"bags": _bag_meta(info), "test_patients": [], "train_patients": train_ids,
                         "val_patients": val_ids})
        val = predict(model, store.many(val_ids), t["batch_size"], device=device, amp=t["amp"], ranks=ranks)
        metrics = {"task": tasks[0] if len(tasks) == 1 else list(tasks), "classes": cohort.classes,
                   "model": spec["model"], "fusion": spec["fusion"],
                   "n_patients": len(ids), "n_train": len(train_ids), "n_val": len(val_ids),
                   "epochs_run": len(history), "backbone": info.backbone, "feature_dim": info.feature_dim,
                   "processes": ranks.world}
        if "classification" in tasks:
            metrics["validation"] = classification_metrics(cohort.labels(val_ids), val.probs, cohort.classes)
        if "survival" in tasks and val.risk is not None:
            vt, ve = cohort.follow_up(val_ids)
            metrics["validation_survival"] = {"c_index": concordance_summary(vt, ve, val.risk, seed=t["seed"])}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        val_y = cohort.labels(val_ids)
        tracker.log_summary(metrics)
        if "classification" in tasks:
            tracker.log_classification_plots("validation", val_y, val.probs, cohort.classes)
        tracker.log_predictions("validation_predictions", val_ids, "patient",
                                [cohort.patients[p].label for p in val_ids], val.probs, cohort.classes)
        tracker.log_checkpoints(tmp / "checkpoints", out.name)
    return metrics
