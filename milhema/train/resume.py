"""Finished folds of a cross-validation in progress, so that ``milhema cv --resume`` continues a killed run.

While ``milhema cv`` runs, its run folder is built as ``.<name>.partial/`` (:mod:`milhema.io`)::

    .<name>.partial/resume.json                 fingerprint of the config and of the cohort + bags
    .<name>.partial/checkpoints/r<r>_f<k>.*     each fold's model, as in the finished run
    .<name>.partial/folds/r<r>_f<k>/history.jsonl   the fold's epochs, appended while it trains
    .<name>.partial/folds/r<r>_f<k>/done.json   written last (flushed to disk) when the fold's
                                                checkpoint is complete: fingerprint + its patients

A fold counts as finished only with a ``done.json`` whose fingerprint and patient lists equal
those of the fold being resumed and whose checkpoint loads. ``--resume`` keeps those folds (their
test predictions are recomputed from the checkpoint; training, the costly part, is skipped) and
trains the others with the same per-fold seeds, so the results equal those of an uninterrupted
run. When the run completes, ``folds/`` and ``resume.json`` are removed, the per-fold histories
are joined into ``history.jsonl``, and the folder gets its final name: a finished run folder
looks the same whether or not it was resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from milhema.data.manifest import Cohort
from milhema.errors import MilhemaError
from milhema.io import check_new_folder, partial_folder, write_text
from milhema.settings import Settings
from milhema.train.checkpoint import CheckpointError, load_checkpoint
from milhema.train.data import BagInfo
from milhema.train.model import PatientModel

log = logging.getLogger(__name__)

PROGRESS_FILE = "resume.json"
FOLDS_DIR = "folds"
DONE_FILE = "done.json"
FORMAT = "milhema-cv-progress"
# Sections that never change a fold's model or predictions: they may differ on resume (`cells` trains the
# cell classifier, a separate run whose predictions reach cv through the bags, fingerprinted with them).
_NEUTRAL_SECTIONS = ("tracking", "cells")
# How bags are loaded never changes the results (tested): a resumed run may stream or use workers.
_NEUTRAL_KEYS = ("data.cache", "data.workers")
RUN_HINT = "choose another folder or pass --overwrite to replace it (--resume continues an interrupted run)"


class ResumeError(MilhemaError):
    """An interrupted run cannot be continued with this config or cohort."""


@dataclass(frozen=True)
class FoldSplit:
    """Who is in which part of one (repeat, fold) of a cv: patient ids in cohort order."""

    repeat: int
    fold: int
    test: list[str]
    train: list[str]
    val: list[str]

    @property
    def name(self) -> str:
        """``r<repeat>_f<fold>``: the fold's checkpoint stem and folder name."""
        return f"r{self.repeat}_f{self.fold}"


def config_fingerprint(settings: Settings) -> str:
    """SHA-256 of the resolved config, without the sections that cannot change results (tracking)."""
    return _sha256(_result_config(settings.to_dict()))


def cohort_fingerprint(cohort: Cohort, ids: Sequence[str], bags: Path | None, info: BagInfo) -> str:
    """SHA-256 of what the folds learn from: every patient's label, CBC, follow-up and slides, the
    size of every bag file, and the backbone, weights and feature columns of the bags.

    Bag contents are not read (that would cost a pass over all features); a bag embedded again
    with the same settings usually changes size, and other settings change ``info``.
    """
    patients = []
    for pid in ids:
        p = cohort.patients[pid]
        slides = [(s.slide_id, s.view, _size(s.bag_path(bags))) for s in cohort.slides_of(pid)]
        patients.append([pid, p.label, sorted(p.values.items()), p.time, p.event, slides])
    bag_info = [info.backbone, info.weights_sha256, info.feature_dim, info.columns]
    return _sha256({"patients": patients, "bags": bag_info, "classes": cohort.classes})


def run_state(out: Path) -> tuple[str, int]:
    """``("complete" | "interrupted" | "new", finished folds)`` of the cv run folder ``out``."""
    out = Path(out)
    partial = partial_folder(out)
    if (partial / PROGRESS_FILE).is_file():
        return "interrupted", sum(1 for _ in _done_files(partial))
    if (out / "metrics.json").is_file():
        return "complete", 0
    return "new", 0


def check_start(out: Path, settings: Settings, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Decide, before any work, what ``milhema cv`` does with ``out``.

    Returns the metrics of ``out`` when ``resume`` finds it already complete (nothing to do),
    else None (start, or continue the interrupted run).

    Raises:
        MilhemaError: both ``resume`` and ``overwrite``; ``out`` exists without either; an
            interrupted run with finished folds would be discarded without ``--overwrite``;
            ``resume`` of a complete run made with another config.
    """
    out = Path(out)
    if resume and overwrite:
        raise MilhemaError("--resume continues an interrupted run and --overwrite starts it again: pass only one")
    state, finished = run_state(out)
    if state == "interrupted" and finished and not resume and not overwrite:
        raise MilhemaError(f"an interrupted cv run in {partial_folder(out)} has {finished} finished fold(s); "
                           "pass --resume to continue it or --overwrite to start again")
    if resume and state == "complete":
        _check_same_config(out / "config.yaml", settings, f"run folder {out} is already complete")
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    if not (resume and state == "interrupted"):
        check_new_folder(out, overwrite=overwrite, what="run folder", hint=RUN_HINT)
    return None


def has_finished_folds(partial: Path) -> bool:
    """Whether an interrupted run's folder holds work worth keeping for ``--resume``."""
    return any(True for _ in _done_files(partial))


class CvProgress:
    """The bookkeeping of finished folds inside a cv run's temporary folder.

    Use as a context manager around the folds: on success it joins the fold histories into
    ``history.jsonl`` and removes itself, so the finished run folder has the usual layout.
    """

    def __init__(self, folder: Path, fingerprint: Mapping[str, str]) -> None:
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint)
        self.reused: list[str] = []
        self._visited: list[FoldSplit] = []

    def __enter__(self) -> CvProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()

    @classmethod
    def open(cls, folder: Path, settings: Settings, cohort_hash: str, *, resume: bool) -> CvProgress:
        """Start the bookkeeping in ``folder``; with ``resume`` check that the interrupted run in it
        was made with the same config and cohort.

        Raises:
            ResumeError: the config or the cohort/bags differ from the interrupted run's.
        """
        folder = Path(folder)
        fingerprint = {"config": config_fingerprint(settings), "cohort": cohort_hash}
        path = folder / PROGRESS_FILE
        if resume and path.is_file():
            _check_fingerprint(folder, fingerprint, settings)
            _clear_leftovers(folder)
        else:
            # A folder without a fingerprint has nothing reusable: clear what a crash left.
            shutil.rmtree(folder / FOLDS_DIR, ignore_errors=True)
            write_text(path, json.dumps({"format": FORMAT, **fingerprint}, indent=2) + "\n", durable=True)
        return cls(folder, fingerprint)

    def reuse(self, split: FoldSplit, checkpoint: Path) -> tuple[PatientModel, list[dict[str, Any]]] | None:
        """The model and per-epoch history of ``split`` if it finished before, else None.

        Call once per fold, in fold order, before :meth:`begin`.
        """
        self._visited.append(split)
        done = self.folder / FOLDS_DIR / split.name / DONE_FILE
        if not done.is_file():
            return None
        try:
            record = json.loads(done.read_text(encoding="utf-8"))
            history = [json.loads(line) for line in self.history_path(split).read_text(encoding="utf-8").splitlines()]
            model, _ = load_checkpoint(checkpoint)
        except (OSError, ValueError, CheckpointError) as exc:
            log.warning("fold %s of the interrupted run is unreadable (%s); training it again", split.name, exc)
            return None
        expected = {"fingerprint": self.fingerprint, "test_patients": split.test, "train_patients": split.train,
                    "val_patients": split.val}
        if any(record.get(key) != value for key, value in expected.items()):
            log.warning("fold %s of the interrupted run had other patients; training it again", split.name)
            return None
        self.reused.append(split.name)
        return model, history

    def begin(self, split: FoldSplit) -> Path:
        """Prepare ``split`` for (re)training; returns its empty history file (appended per epoch)."""
        folder = self.folder / FOLDS_DIR / split.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        path = self.history_path(split)
        path.touch()
        return path

    def finish(self, split: FoldSplit) -> None:
        """Mark ``split`` finished; call only once its checkpoint is written."""
        record = {"fingerprint": self.fingerprint, "repeat": split.repeat, "fold": split.fold,
                  "test_patients": split.test, "train_patients": split.train, "val_patients": split.val,
                  "checkpoint": f"checkpoints/{split.name}"}
        write_text(self.folder / FOLDS_DIR / split.name / DONE_FILE, json.dumps(record, indent=2) + "\n",
                   durable=True)

    def history_path(self, split: FoldSplit) -> Path:
        return self.folder / FOLDS_DIR / split.name / "history.jsonl"

    def close(self) -> None:
        """Join the fold histories into ``history.jsonl`` (fold order) and drop the bookkeeping."""
        text = "".join(self.history_path(s).read_text(encoding="utf-8") for s in self._visited)
        write_text(self.folder / "history.jsonl", text)
        shutil.rmtree(self.folder / FOLDS_DIR)
        (self.folder / PROGRESS_FILE).unlink()


def _check_fingerprint(folder: Path, fingerprint: Mapping[str, str], settings: Settings) -> None:
    try:
        before = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot resume the interrupted run in {folder}: its {PROGRESS_FILE} is unreadable; "
                          "pass --overwrite to start again") from exc
    if before.get("config") != fingerprint["config"]:
        _check_same_config(folder / "config.yaml", settings, "cannot resume the interrupted run")
        raise ResumeError(f"cannot resume the interrupted run in {folder}: its config differs; "
                          "pass the same config or --overwrite to start again")
    if before.get("cohort") != fingerprint["cohort"]:
        raise ResumeError(f"cannot resume the interrupted run in {folder}: the cohort or its bags changed "
                          "since (patients, labels, CBC values, slides or bag files differ); pass the "
                          "same cohort and bags or --overwrite to start again")


def _clear_leftovers(folder: Path) -> None:
    """What the killed process was writing: its W&B run (the new run replays the finished folds'
    epochs) and temporary files that were never renamed."""
    shutil.rmtree(folder / "wandb", ignore_errors=True)
    for stale in folder.rglob(".*.tmp"):
        stale.unlink()


def _done_files(partial: Path) -> Iterator[Path]:
    return (partial / FOLDS_DIR).glob(f"*/{DONE_FILE}")


def _check_same_config(path: Path, settings: Settings, what: str) -> None:
    """Raise a :class:`ResumeError` naming the first config key that differs from ``path``'s."""
    try:
        before = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ResumeError(f"{what}, but its {path.name} is unreadable ({str(exc).splitlines()[0]}); "
                          "pass --overwrite to start again") from exc
    old, new = _flat(_result_config(before or {})), _flat(_result_config(settings.to_dict()))
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            raise ResumeError(f"{what} with another config: {key} was {old.get(key)!r} and is now "
                              f"{new.get(key)!r}; pass the same config, or --overwrite to start again")


def _result_config(config: Mapping[str, Any]) -> dict[str, Any]:
    # Through JSON, so tuples in memory equal the lists read back from config.yaml.
    kept = json.loads(json.dumps({k: v for k, v in config.items() if k not in _NEUTRAL_SECTIONS}, default=str))
    for dotted in _NEUTRAL_KEYS:
        section, _, key = dotted.partition(".")
        kept.get(section, {}).pop(key, None)
    return kept


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1
