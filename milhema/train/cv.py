"""``milhema cv``: patient-grouped, label-stratified K-fold cross-validation, repeated.

Three steps, as in scikit-learn's ``cross_validate``: :func:`run_fold` trains (or, on
``--resume``, reuses) and scores one fold and returns a :class:`FoldResult`; :class:`CvResults`
gathers the folds of every repeat into out-of-fold predictions and metrics; :func:`write_outputs`
writes the run folder's tables. :func:`run_cv` strings them together.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from milhema.data.manifest import Cohort
from milhema.differential import differential_columns
from milhema.errors import MilhemaError
from milhema.io import partial_folder, write_csv, write_text
from milhema.settings import Settings
from milhema.train import distributed
from milhema.train.baseline import cbc_design, cross_val_proba, patient_folds
from milhema.train.calibration import apply_temperature, calibration_figure, coverage_curve
from milhema.train.checkpoint import load_checkpoint, save_checkpoint
from milhema.train.data import PatientBag
from milhema.train.distributed import Ranks
from milhema.train.inference import FoldPredictions, occlusion, predict_patients
from milhema.train.metrics import brier, diagnostic_auroc, expected_calibration_error, summarise_repeats
from milhema.train.model import PatientModel
from milhema.train.outputs import prediction_header, prediction_rows, rank_percentiles, write_cell_scores
from milhema.train.predict import SIGNATURES_FILE, patient_signature
from milhema.train.resume import (
    RUN_HINT,
    CvProgress,
    FoldSplit,
    check_start,
    cohort_fingerprint,
    has_finished_folds,
    run_state,
)
from milhema.train.run import (
    Prepared,
    RunFolder,
    bag_meta,
    event_strata,
    fold_seed,
    history_writer,
    inner_split,
    metrics_header,
    open_run,
    prepare,
    publish,
    save_cbc_baseline,
    start_devices,
    train_model,
)
from milhema.train.survival import cbc_cox_risk, concordance_summary, kaplan_meier_plot


@dataclass(frozen=True)
class CvPlan:
    """Everything the folds share: settings, cohort, bags and the patients with their strata.

    ``cbc`` is the patient-feature (CBC) design matrix ``[P, F]`` of ``prepared.ids`` for the
    CBC-only baselines, which a cohort without patient features (``F = 0``) does not have;
    ``time`` / ``event`` are ``[P]`` (NaN without follow-up).
    """

    settings: Settings
    cohort: Cohort
    prepared: Prepared
    y: np.ndarray
    strata: np.ndarray
    time: np.ndarray
    event: np.ndarray
    cbc: np.ndarray
    occluded: frozenset[str] = frozenset()
    bags: Path | None = None

    @classmethod
    def build(cls, settings: Settings, cohort: Cohort, bags: Path | None) -> CvPlan:
        prepared = prepare(settings, cohort, bags)
        cohort = prepared.cohort   # with the patient features computed from the bags
        ids = prepared.ids
        y = cohort.labels(ids)
        time_, event = cohort.follow_up(ids)
        # Folds are stratified by label; for survival alone, by event (censored patients as one group).
        strata = y if settings.loss.has_classification else event_strata(event, settings.cv.folds)
        return cls(settings, cohort, prepared, y, strata, time_, event,
                   cbc_design(cohort, ids, settings.data.log_features),
                   _occlusion_subset(ids, strata, settings.cv.occlusion_patients, settings.train.seed), bags)

    @property
    def ids(self) -> list[str]:
        return self.prepared.ids

    @property
    def has_baseline(self) -> bool:
        """Whether there are patient features for the CBC-only baselines to learn from."""
        return self.cbc.shape[1] > 0

    def folds(self, repeat: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(train, test)`` positions in :attr:`ids` of every fold of ``repeat``."""
        s = self.settings
        names = list(self.cohort.classes) if s.loss.has_classification else ["censored", "event"]
        return patient_folds(self.strata, s.cv.folds, s.train.seed + repeat, names)

    def split(self, repeat: int, fold: int, train_idx: np.ndarray, test_idx: np.ndarray) -> Fold:
        """The fold's test patients, and its training patients split into inner training and validation."""
        ids, t = self.ids, self.settings.train
        train_ids = [ids[i] for i in train_idx]
        test_ids = [ids[i] for i in test_idx]
        inner_train, val = inner_split(train_ids, self.strata[train_idx], t.val_fraction, t.seed + repeat)
        if set(test_ids) & (set(inner_train) | set(val)):
            raise MilhemaError("internal check failed: a test patient is also in training")  # never expected
        return Fold(FoldSplit(repeat, fold, test_ids, inner_train, val), train_idx, test_idx)


@dataclass(frozen=True)
class Fold:
    """One (repeat, fold): its patients by id (``split``) and by position in :attr:`CvPlan.ids`."""

    split: FoldSplit
    train_idx: np.ndarray
    test_idx: np.ndarray


@dataclass
class FoldResult:
    """What one fold contributes, for its test patients (in ``fold.test_idx`` order).

    ``risk`` / ``cbc_risk`` are within-fold risk percentiles in (0, 1] of the model and of the
    CBC-only Cox baseline (survival only). The cell-score maps are filled on repeat 0 for patients
    whose bags carry ``diagnostic`` truth (occlusion on a budget, see ``cv.occlusion_patients``).
    ``bags`` are the test bags themselves, for writing their cell scores; nothing keeps them after.
    """

    fold: Fold
    predictions: FoldPredictions
    bags: list[PatientBag]
    temperature: float = 1.0
    risk: np.ndarray | None = None
    cbc_risk: np.ndarray | None = None
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    occlusion: dict[str, np.ndarray] = field(default_factory=dict)
    truth: dict[str, np.ndarray | None] = field(default_factory=dict)


def run_fold(plan: CvPlan, fold: Fold, run: RunFolder, folds_done: CvProgress, device: torch.device,
             ranks: Ranks, progress: bool) -> FoldResult:
    """Train the fold's model (or reuse a finished one) and score its test patients."""
    model = _fold_model(plan, fold.split, run, folds_done, device, ranks, progress)
    return score_fold(plan, fold, model, device, ranks)


def _fold_model(plan: CvPlan, split: FoldSplit, run: RunFolder, folds_done: CvProgress, device: torch.device,
                ranks: Ranks, progress: bool) -> PatientModel:
    checkpoint = run.path / "checkpoints" / split.name
    model = _reuse_fold(folds_done, split, checkpoint, run)
    if ranks.active:  # rank 0 alone keeps the interrupted run: the others follow its choice
        shared = _share_reused(model, partial_folder(run.out) / "checkpoints" / split.name, ranks)
        if shared is not None and model is None:
            folds_done.begin(split)  # an empty history in this rank's scratch bookkeeping
        model = shared
    if model is not None:
        return model
    log = history_writer(folds_done.begin(split), run.tracker, split.name, repeat=split.repeat, fold=split.fold)
    prep = plan.prepared
    seed = fold_seed(plan.settings.train.seed, split.repeat, split.fold)
    model, _ = train_model(plan.settings, prep.store, prep.spec, split.train, split.val, device, log, progress,
                           desc=f"repeat {split.repeat} fold {split.fold}", ranks=ranks, seed=seed)
    save_checkpoint(checkpoint, model, model.spec,
                    {"bags": bag_meta(prep.info, prep.cell_classifier), "repeat": split.repeat, "fold": split.fold, "seed": seed,
                     "test_patients": split.test, "train_patients": split.train, "val_patients": split.val})
    folds_done.finish(split)
    return model


def _reuse_fold(progress: CvProgress, split: FoldSplit, checkpoint: Path, run: RunFolder) -> PatientModel | None:
    """The model of a fold the interrupted run finished; its epochs go to the (new) tracker run again."""
    found = progress.reuse(split, checkpoint)
    if found is None:
        return None
    model, history = found
    for record in history:
        run.tracker.log_epoch({k: v for k, v in record.items() if k not in ("repeat", "fold")}, split.name)
    return model


def _share_reused(model: PatientModel | None, checkpoint: Path, ranks: Ranks) -> PatientModel | None:
    """Under torchrun with ``--resume``: rank 0's decision to reuse a finished fold, and its model, on every rank."""
    if not distributed.broadcast(model is not None, ranks):
        return None
    if model is None:
        model, _ = load_checkpoint(checkpoint)
    return model


def score_fold(plan: CvPlan, fold: Fold, model: PatientModel, device: torch.device, ranks: Ranks) -> FoldResult:
    """Predictions of the fold's test patients (bags read once), risks, and faithfulness scores on repeat 0."""
    s, split = plan.settings, fold.split
    bags = list(plan.prepared.store.many(split.test))
    result = FoldResult(fold, predict_patients(model, bags, s.train.batch_size, device, ranks), bags,
                        model.temperature)
    patient = result.predictions.patient
    if s.loss.has_survival and patient.risk is not None:
        train, test = fold.train_idx, fold.test_idx
        result.risk = rank_percentiles(patient.risk) / 100.0
        if plan.has_baseline:
            result.cbc_risk = rank_percentiles(
                cbc_cox_risk(plan.cbc[train], plan.time[train], plan.event[train], plan.cbc[test])) / 100.0
    if split.repeat != 0:
        return result
    for j, bag in enumerate(bags):
        result.truth[bag.patient_id] = bag.diagnostic
        if bag.diagnostic is not None and s.loss.has_classification:
            result.attention[bag.patient_id] = patient.cell_scores[j]
            if bag.patient_id in plan.occluded:
                target = int(patient.probs[j].argmax())
                drops = occlusion(model, bag, device)
                result.occlusion[bag.patient_id] = drops[:, target] if drops.shape[0] else np.zeros(0)
    return result


class CvResults:
    """Out-of-fold predictions of every repeat, gathered fold by fold, and the metrics they give.

    Arrays are ``[R, P, ...]`` over repeats and :attr:`CvPlan.ids`; ``fold_of[r, i]`` is the fold
    that tested patient i in repeat r.
    """

    def __init__(self, plan: CvPlan) -> None:
        self.plan = plan
        repeats, n, k = plan.settings.cv.repeats, len(plan.ids), len(plan.cohort.classes)
        self.patient_probs = np.zeros((repeats, n, k))      # calibrated (each fold's temperature)
        self.raw_probs = np.zeros((repeats, n, k))          # before temperature scaling
        self.temperatures: list[float] = []
        self.cbc_probs = np.zeros((repeats, n, k))
        self.fold_of = np.zeros((repeats, n), int)
        self.patient_risk = np.full((repeats, n), np.nan)
        self.cbc_risk = np.full((repeats, n), np.nan)
        self.slides: list[tuple[str, str, int, int, np.ndarray]] = []   # slide, patient, repeat, fold, probs
        self.faithful: dict[str, dict[str, np.ndarray]] = {"attention": {}, "occlusion": {}}
        self.truth: dict[str, np.ndarray | None] = {}
        self.signatures: dict[str, str] = {}   # what the run's patients' data were (predict's out-of-fold check)

    def add(self, result: FoldResult) -> None:
        """Take one fold's test predictions into the out-of-fold arrays."""
        fold, pred = result.fold, result.predictions
        r, k, test = fold.split.repeat, fold.split.fold, fold.test_idx
        self.patient_probs[r, test] = pred.patient.probs
        self.raw_probs[r, test] = apply_temperature(pred.patient.probs, 1.0 / result.temperature)
        self.temperatures.append(result.temperature)
        self.fold_of[r, test] = k
        if result.risk is not None:
            self.patient_risk[r, test] = result.risk
        if result.cbc_risk is not None:
            self.cbc_risk[r, test] = result.cbc_risk
        self.slides += [(sid, pred.slide_patient[j], r, k, pred.slide.probs[j]) for j, sid in enumerate(pred.slide_ids)]
        self.signatures |= {bag.patient_id: patient_signature(bag) for bag in result.bags}
        self.faithful["attention"] |= result.attention
        self.faithful["occlusion"] |= result.occlusion
        self.truth |= result.truth

    def _calibration(self, folder: Path) -> dict[str, Any]:
        """Calibration and coverage of the repeat-averaged out-of-fold probabilities."""
        return _calibration_summary(self.plan.y, self.raw_probs.mean(axis=0), self.patient_probs.mean(axis=0),
                                    self.temperatures, len(self.plan.cohort.classes), folder,
                                    fitted=self.plan.settings.train.val_fraction > 0)

    def metrics(self, folder: Path, ranks: Ranks, started: float) -> dict[str, Any]:
        """metrics.json of the run (the Kaplan-Meier figure of a survival task goes to ``folder``)."""
        plan, s = self.plan, self.plan.settings
        classes = plan.cohort.classes
        metrics = metrics_header(s, plan.prepared.spec, classes)
        if not plan.has_baseline:
            metrics["notes"] = ["no CBC-only baseline: data.patient_features is empty"]
        if s.loss.has_classification:
            slide, from_slides = _slide_level(self.slides, plan.ids, plan.cohort, classes, s.cv.repeats)
            metrics |= {
                "patient": summarise_repeats(plan.y, self.patient_probs, classes),
                "slide": slide,
                "patient_from_slides": from_slides,
                "baselines": {"cbc_only": {"patient": summarise_repeats(plan.y, self.cbc_probs, classes)}}
                if plan.has_baseline else {},
                **self._calibration(folder),
            }
        attention, occluded = self.faithful["attention"], self.faithful["occlusion"]
        if attention:
            metrics["attention"] = {"diagnostic_auroc": diagnostic_auroc(attention, self.truth)}
        if occluded:  # a subset (occlusion costs a pass per cell): attention on the same patients beside it
            metrics["occlusion"] = {
                "diagnostic_auroc": diagnostic_auroc(occluded, self.truth),
                "attention_on_the_same_patients": diagnostic_auroc({p: attention[p] for p in occluded}, self.truth),
                "patients": "a class-stratified random subset of cv.occlusion_patients (seed train.seed)"}
        if s.loss.has_survival:
            metrics["survival"] = _survival_metrics(plan.time, plan.event, self.patient_risk,
                                                    self.cbc_risk if plan.has_baseline else None, folder, s.train.seed)
        info = plan.prepared.info
        return metrics | {
            "n_patients": len(plan.ids), "n_slides": len({rec[0] for rec in self.slides}), "folds": s.cv.folds,
            "repeats": s.cv.repeats, "backbone": info.backbone, "feature_dim": info.feature_dim,
            "processes": ranks.world, "wall_time_s": round(time.perf_counter() - started, 1),
        }


def _calibration_summary(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, temperatures: Sequence[float],
                         n_classes: int, folder: Path, fitted: bool = True) -> dict[str, Any]:
    """Temperature scaling's effect (ECE and Brier before and after, out of fold) and the coverage
    curve of the calibrated probabilities; the figure goes to ``folder/calibration.png``. ``fitted``
    False: the folds had no validation split, every temperature is 1 and before equals after."""
    coverage = coverage_curve(y, calibrated, n_classes)
    calibration_figure(y, raw, calibrated, coverage, folder / "calibration.png")
    return {
        "calibration": {
            "method": "temperature scaling fitted on each fold's inner validation split" if fitted else
                      "none: train.val_fraction is 0, so no fold has a validation split to fit a temperature on",
            "temperature": {"mean": float(np.mean(temperatures)), "per_fold": [round(t, 4) for t in temperatures]},
            "ece": {"before": expected_calibration_error(y, raw), "after": expected_calibration_error(y, calibrated)},
            "brier": {"before": brier(y, raw), "after": brier(y, calibrated)},
            "figure": "calibration.png",
        },
        "coverage": coverage,
    }


def _occlusion_subset(ids: Sequence[str], strata: np.ndarray, n: int, seed: int) -> frozenset[str]:
    """The patients whose cells cv occludes: ``n`` drawn at random, stratified by class (by event
    for survival), so that the faithfulness of occlusion speaks for every class, not for the
    first patients of the file."""
    if n <= 0:
        return frozenset()
    if n >= len(ids):
        return frozenset(ids)
    try:
        chosen, _ = train_test_split(list(ids), train_size=n, stratify=strata, random_state=seed)
    except ValueError:  # a class too small to stratify
        chosen, _ = train_test_split(list(ids), train_size=n, random_state=seed)
    return frozenset(chosen)


def _slide_level(records: Sequence[tuple[str, str, int, int, np.ndarray]], ids: Sequence[str], cohort: Cohort,
                 classes: Sequence[str], repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of single-slide predictions, and of their per-patient average, summarised per repeat
    as the patient metrics are. Slide intervals resample patients (all their slides together):
    slides of one patient are not independent."""
    slide_ids = list(dict.fromkeys(rec[0] for rec in records))
    patient_of = {sid: pid for sid, pid, _, _, _ in records}
    column = {sid: j for j, sid in enumerate(slide_ids)}
    slide_probs = np.zeros((repeats, len(slide_ids), len(classes)))
    for sid, _, r, _, prob in records:
        slide_probs[r, column[sid]] = prob
    slide_y = cohort.labels([patient_of[s] for s in slide_ids])
    columns_of: dict[str, list[int]] = {}
    for sid in slide_ids:
        columns_of.setdefault(patient_of[sid], []).append(column[sid])
    with_slides = [p for p in ids if p in columns_of]
    averaged = np.stack([[slide_probs[r, columns_of[p]].mean(axis=0) for p in with_slides]
                         for r in range(repeats)]).reshape(repeats, len(with_slides), -1)
    return (summarise_repeats(slide_y, slide_probs, classes, groups=np.array([patient_of[s] for s in slide_ids])),
            summarise_repeats(cohort.labels(with_slides), averaged, classes))


def _survival_metrics(time_: np.ndarray, event: np.ndarray, risk: np.ndarray, cbc_risk: np.ndarray | None,
                      folder: Path, seed: int) -> dict[str, Any]:
    """C-index (with bootstrap CI) of the out-of-fold risks per repeat, KM tertiles and the CBC Cox baseline.

    Risks of different fold models are not on one scale, so each fold's risks are turned into
    within-fold percentiles before the pooled c-index (a common, conservative choice).
    """
    model = _over_repeats(concordance_summary(time_, event, risk, seed=seed))
    p_value = kaplan_meier_plot(time_, event, risk[0], folder / "km_risk_groups.png")
    baselines = {}
    if cbc_risk is not None:
        cbc = _over_repeats(concordance_summary(time_, event, cbc_risk, seed=seed))
        baselines["cbc_cox"] = {"c_index": {k: v for k, v in cbc.items() if k not in ("n", "events")}}
    return {
        "c_index": model, "logrank_p": p_value,
        "risk_groups": "tertiles of out-of-fold risk (repeat 0); curves in km_risk_groups.png",
        "n_patients": model.pop("n"), "events": model.pop("events"), "baselines": baselines,
    }


def _over_repeats(summary: dict[str, Any]) -> dict[str, Any]:
    """A c-index summary with ``std`` (spread over repeats; None for one) and ``per_repeat`` always present."""
    values = summary.pop("per_repeat", [summary["mean"]])
    return {**summary, "std": float(np.std(values)) if len(values) > 1 else None, "per_repeat": values}


def write_fold_cells(folder: Path, result: FoldResult, classes: Sequence[str]) -> None:
    """``cell_scores/<slide_id>.csv`` of the fold's test patients."""
    patient = result.predictions.patient
    for j, bag in enumerate(result.bags):
        write_cell_scores(folder, bag, patient.cell_scores[j], patient.class_cell_scores[j], classes)


def write_outputs(run: RunFolder, results: CvResults, metrics: Mapping[str, Any]) -> None:
    """predictions.csv (every repeat), slide_predictions.csv, metrics.json and the tracker's copies."""
    plan = results.plan
    ids, classes, survive = plan.ids, plan.cohort.classes, plan.settings.loss.has_survival
    labels = [plan.cohort.patients[p].label for p in ids]
    rows = []
    for r in range(plan.settings.cv.repeats):
        risk = results.patient_risk[r]
        rows += prediction_rows(ids, labels, results.patient_probs[r], classes,
                                [(int(results.fold_of[r, i]), r, *((f"{risk[i]:.6f}",) if survive else ()))
                                 for i in range(len(ids))])
    write_csv(run.path / "predictions.csv",
              prediction_header("patient_id", classes, ["fold", "repeat", *(["risk"] if survive else [])]), rows)
    write_csv(run.path / "slide_predictions.csv",
              prediction_header("slide_id", classes, ["patient_id", "fold", "repeat"]),
              [prediction_rows([sid], [plan.cohort.patients[pid].label], prob[None], classes, [(pid, k, r)])[0]
               for sid, pid, r, k, prob in results.slides])
    save_cbc_baseline(run, plan.settings, plan.cohort, ids)
    write_text(run.path / SIGNATURES_FILE, json.dumps({"format": "milhema-run-patients",
                                                      "signatures": results.signatures}, indent=1) + "\n")
    mean_probs = results.patient_probs.mean(axis=0)
    plots = {"patient": (plan.y, mean_probs)}
    if plan.has_baseline:
        plots["baselines/cbc_only/patient"] = (plan.y, results.cbc_probs.mean(axis=0))
    # The predicted differential beside each patient's prediction, when the bags carry one.
    extra = {"fold": results.fold_of[0].tolist(), **differential_columns(plan.cohort, plan.bags, ids)}
    publish(run, metrics, "predictions", ids, labels, mean_probs, classes,
            plots if plan.settings.loss.has_classification else {}, extra)


def _folds(plan: CvPlan, results: CvResults) -> Iterator[Fold]:
    """Every (repeat, fold) in order; the CBC-only baseline of a repeat is scored on its folds first."""
    s = plan.settings
    for r in range(s.cv.repeats):
        splits = plan.folds(r)
        if s.loss.has_classification and plan.has_baseline:
            results.cbc_probs[r] = cross_val_proba(plan.cbc, plan.y, splits, len(plan.cohort.classes), s.train.seed)
        for k, (train_idx, test_idx) in enumerate(splits):
            yield plan.split(r, k, train_idx, test_idx)


def run_cv(settings: Settings, cohort: Cohort, bags: str | Path | None, out: str | Path, *, overwrite: bool = False,
           resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Patient-grouped, label-stratified K-fold cross-validation, repeated ``cv.repeats`` times.

    ``resume`` continues an interrupted run into ``out`` from its finished folds
    (:mod:`milhema.train.resume`), or returns the metrics of ``out`` if it is already complete.
    """
    out = Path(out)
    bags = None if bags is None else Path(bags)
    finished = check_start(out, settings, resume=resume, overwrite=overwrite)
    if finished is not None:
        return finished
    resuming = resume and run_state(out)[0] == "interrupted"
    plan = CvPlan.build(settings, cohort, bags)
    cohort = plan.cohort
    device, ranks = start_devices(settings)
    progress = progress and ranks.is_main
    started = time.perf_counter()
    fingerprint = cohort_fingerprint(cohort, plan.ids, bags, plan.prepared.info)
    # An interrupted run beside a finished one was started with --overwrite: it replaces it.
    with open_run(settings, out, ranks, "cv", overwrite=overwrite or resuming, hint=RUN_HINT,
                  reuse_partial=resuming, keep_partial=has_finished_folds,
                  bookkeeping=lambda path: CvProgress.open(path, settings, fingerprint,
                                                           resume=resuming and ranks.is_main)) as (run, folds_done):
        results = CvResults(plan)
        bar = tqdm(total=settings.cv.folds * settings.cv.repeats, desc=f"cv {plan.prepared.spec['model']}",
                   unit="fold", disable=None if progress else True)
        for fold in _folds(plan, results):
            result = run_fold(plan, fold, run, folds_done, device, ranks, progress)
            if fold.split.repeat == 0:
                write_fold_cells(run.path / "cell_scores", result, cohort.classes)
            results.add(result)
            bar.update(1)
        bar.close()
        metrics = results.metrics(run.path, ranks, started)
        write_outputs(run, results, metrics)
    return metrics
