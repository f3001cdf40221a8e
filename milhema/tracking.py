"""Experiment tracking with Weights & Biases, set by the config's ``tracking`` section.

One W&B run per ``milhema train`` or ``milhema cv`` call (all folds of a cv in the same run, their
per-epoch keys prefixed ``r<repeat>_f<fold>/``), grouped by ``tracking.group`` (default: the run
folder's name). One run per call is what a W&B sweep expects: the agent starts one program per
trial and reads the trial's final metric from that run's summary.

Logged: the resolved config; every per-epoch record that also goes to ``history.jsonl``; the
final metrics with their CIs as summary values (``patient/balanced_accuracy``,
``patient/balanced_accuracy_ci_low``, ..., ``baselines/cbc_only/patient/...``); confusion matrix
and ROC plots; a predictions table whose patient ids are pseudonymised; the checkpoints as a
``model`` artifact when ``tracking.log_checkpoint`` is true; images only when
``tracking.log_images`` is true.

Privacy: identifiers leave the machine only as keyed hashes (:mod:`milhema.privacy`), W&B's
system metadata (host, user, command line, git) is not collected, and the console is not
captured. Robustness: any tracking failure becomes a :class:`~milhema.errors.TrackingWarning`
and the tracker turns into a no-op; training never stops because of it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from milhema.errors import TrackingError, TrackingWarning
from milhema.privacy import Pseudonymizer, load_or_create_salt, salt_path
from milhema.settings import Settings

Mode = Literal["online", "offline", "disabled"]
_PRIVACY_RANK = {"online": 0, "offline": 1, "disabled": 2}
# Lists of identifiers inside a checkpoint's JSON (milhema.train.checkpoint).
_CHECKPOINT_ID_LISTS = ("test_patients", "train_patients", "val_patients")


def effective_mode(configured: str, environ: Mapping[str, str] | None = None) -> Mode:
    """``tracking.mode``, made more private (never less) by ``WANDB_MODE`` / ``WANDB_DISABLED``.

    So ``WANDB_MODE=offline make test`` can never send anything, whatever a config file says.
    """
    env = os.environ if environ is None else environ
    modes = [configured]
    from_env = env.get("WANDB_MODE", "").strip().lower()
    modes.append({"dryrun": "offline"}.get(from_env, from_env))
    if env.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        modes.append("disabled")
    return cast(Mode, max((m for m in modes if m in _PRIVACY_RANK), key=_PRIVACY_RANK.__getitem__))


def offline_runs(run_folder: str | Path) -> list[Path]:
    """The offline W&B run folders of a milhema run folder (what ``wandb sync`` takes), oldest first."""
    return sorted(Path(run_folder).glob("wandb/offline-run-*"))


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | str]:
    """metrics.json as flat W&B summary values.

    ``{"patient": {"balanced_accuracy": {"mean": m, "std": s, "ci95": [lo, hi]}}}`` becomes
    ``patient/balanced_accuracy`` = m, ``..._std`` = s, ``..._ci_low`` = lo, ``..._ci_high`` = hi.
    Lists (classes, confusion matrices, per-repeat values) are left out: they are in the config,
    the plots, or metrics.json.
    """
    flat: dict[str, float | int | str] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "mean" in value and "ci95" in value:
            flat[name] = value["mean"]
            if value.get("std") is not None:
                flat[f"{name}_std"] = value["std"]
            flat[f"{name}_ci_low"], flat[f"{name}_ci_high"] = value["ci95"]
        elif isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
    return flat


class Tracker:
    """Where a run's numbers go besides its run folder. Every method is a no-op when inactive.

    Build one with :func:`start_tracker`; ``Tracker()`` is the inactive tracker of ``mode: disabled``.
    """

    def __init__(self, run: Any = None, wandb: Any = None, *, pseudonym: Pseudonymizer | None = None,
                 log_images: bool = False, log_checkpoint: bool = False, root: Path | None = None) -> None:
        self._run = run
        self._wandb = wandb
        self.pseudonym = pseudonym or Pseudonymizer(None)
        self.log_images = log_images
        self.log_checkpoint = log_checkpoint
        self._root = root
        self._step_metrics: set[str] = set()

    @property
    def active(self) -> bool:
        """True while a W&B run is open and nothing has failed."""
        return self._run is not None

    @property
    def local_dir(self) -> Path | None:
        """The W&B run's own folder relative to the milhema run folder (``wandb/offline-run-...``)."""
        if self._run is None or self._root is None:
            return None
        try:
            return Path(self._run.dir).parent.relative_to(self._root)
        except (ValueError, AttributeError):
            return None

    def log_epoch(self, record: Mapping[str, Any], prefix: str = "") -> None:
        """One epoch's record (the dict written to history.jsonl), keys prefixed ``<prefix>/``.

        The epoch number is each prefix's x-axis, so folds are comparable curves in W&B.
        """
        def log() -> None:
            keyed = {f"{prefix}/{k}" if prefix else k: v for k, v in record.items()}
            if prefix not in self._step_metrics:
                self._step_metrics.add(prefix)
                step = f"{prefix}/epoch" if prefix else "epoch"
                self._run.define_metric(step)
                for key in keyed:
                    if key != step:
                        self._run.define_metric(key, step_metric=step)
            self._run.log(keyed)
        self._guard("logging an epoch", log)

    def log_summary(self, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Final metrics (metrics.json's structure) as flat summary values, see :func:`flatten_metrics`."""
        self._guard("logging the summary", lambda: self._run.summary.update(flatten_metrics(metrics, prefix)))

    def log_classification_plots(self, key: str, y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> None:
        """Confusion matrix and one-vs-rest ROC curves of ``probs [P, K]`` against labels ``y [P]`` (ints)."""
        def log() -> None:
            plot = self._wandb.plot
            y_list = [int(v) for v in np.asarray(y)]
            prob_list = np.asarray(probs, dtype=float).tolist()
            self._run.log({
                f"{key}/confusion_matrix": plot.confusion_matrix(
                    y_true=y_list, preds=[int(v) for v in np.asarray(probs).argmax(1)], class_names=list(classes),
                    title=f"{key}: confusion matrix"),
                f"{key}/roc": plot.roc_curve(y_list, prob_list, labels=list(classes), title=f"{key}: ROC"),
            })
        self._guard("logging plots", log)

    def log_predictions(self, key: str, ids: Sequence[str], kind: str, labels: Sequence[str | None],
                        probs: np.ndarray, classes: Sequence[str],
                        extra: Mapping[str, Sequence[Any]] | None = None) -> None:
        """A predictions table; ``ids`` (of ``kind`` patient or slide) are pseudonymised unless switched off."""
        def log() -> None:
            extra_cols = dict(extra or {})
            columns = [f"{kind}_id", "label", "pred", *(f"prob_{c}" for c in classes), *extra_cols]
            data = []
            for i, (identifier, label) in enumerate(zip(ids, labels, strict=True)):
                row = [self.pseudonym(identifier, kind), label or "", classes[int(np.argmax(probs[i]))],
                       *(float(p) for p in probs[i]), *(_plain(v[i]) for v in extra_cols.values())]
                data.append(row)
            self._run.log({key: self._wandb.Table(columns=columns, data=data)})
        self._guard("logging predictions", log)

    def log_checkpoints(self, folder: Path, name: str) -> None:
        """Every ``*.safetensors`` + ``*.json`` checkpoint of ``folder`` as one ``model`` artifact.

        Only with ``tracking.log_checkpoint: true``. Patient lists inside the JSON files are
        pseudonymised (a pseudonymised checkpoint still loads; predict then treats every patient
        as new and uses the fold ensemble).
        """
        if not self.log_checkpoint:
            return

        def log() -> None:
            artifact = self._wandb.Artifact(_artifact_name(name), type="model",
                                            metadata={"pseudonymized": self.pseudonym.enabled})
            for path in sorted(Path(folder).iterdir()):
                if path.suffix == ".safetensors":
                    artifact.add_file(str(path), name=path.name)
                elif path.suffix == ".json":
                    document = json.loads(path.read_text(encoding="utf-8"))
                    for list_key in _CHECKPOINT_ID_LISTS:
                        if isinstance(document.get(list_key), list):
                            document[list_key] = [self.pseudonym(p, "patient") for p in document[list_key]]
                    with artifact.new_file(path.name, mode="w", encoding="utf-8") as fh:
                        fh.write(json.dumps(document, indent=2) + "\n")
            self._run.log_artifact(artifact)
        self._guard("logging the checkpoint artifact", log)

    def log_image(self, key: str, image: Any, caption: str | None = None) -> bool:
        """Log one image (array ``[H, W, 3]`` uint8, PIL image or file) only if ``tracking.log_images``.

        Cell images can show more than a diagnosis, so they never leave the machine by default.
        Returns whether the image was logged.
        """
        if not self.log_images or self._run is None:
            return False

        def log() -> bool:
            self._run.log({key: self._wandb.Image(image, caption=caption)})
            return True
        return bool(self._guard("logging an image", log))

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # A failed run is still closed, marked failed, so its folder is never left half-written.
        self.finish(exit_code=0 if exc_type is None else 1)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (writes everything to disk in offline mode); safe to call twice."""
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # wandb raises many types (network, service, file system)
            _warn("finishing the run", exc)

    def _guard(self, what: str, action: Callable[[], Any]) -> Any:
        if self._run is None:
            return None
        try:
            return action()
        except Exception as exc:  # wandb raises many types (network, service, file system)
            _warn(what, exc)
            run, self._run = self._run, None
            try:
                run.finish(exit_code=1)
            except Exception:  # already failing; the warning above said so
                pass
            return None


def start_tracker(settings: Settings, run_folder: Path, *, name: str, job_type: str,
                  final_folder: Path | None = None, environ: Mapping[str, str] | None = None) -> Tracker:
    """Open the W&B run of a milhema run, or return an inactive tracker (disabled, or setup failed).

    ``run_folder`` is where the files are being written (the temporary folder of
    :func:`milhema.io.atomic_folder`); the W&B files go to ``<run_folder>/wandb/`` and move with
    it when it is renamed to ``final_folder``. ``name`` names the run (and the group by default).
    """
    t = settings.tracking
    mode = effective_mode(t.mode, environ)
    if mode == "disabled":
        return Tracker()
    try:
        pseudonym = Pseudonymizer(_salt(t.salt_file, [run_folder, final_folder], environ) if t.pseudonymize else None)
        import wandb  # lazily: importing wandb takes ~0.5 s and is not needed when tracking is off

        run = wandb.init(
            mode=mode, project=t.project, entity=t.entity, group=t.group or name, job_type=job_type,
            name=name, tags=list(t.tags), dir=str(run_folder), config=settings.to_dict(),
            reinit="create_new",  # never finish or reuse a run the caller has open
            settings=wandb.Settings(
                silent=True, console="off",  # console output may name files and slides
                disable_git=True, save_code=False, x_save_requirements=False,
                x_disable_meta=True,  # host, user name, command line and paths are not sent
            ),
        )
        if run is None:
            raise TrackingError("wandb.init returned no run")
    except Exception as exc:  # wandb raises many types (usage, network, service, file system)
        _warn("starting the run", exc)
        return Tracker()
    return Tracker(run, wandb, pseudonym=pseudonym, log_images=t.log_images, log_checkpoint=t.log_checkpoint,
                   root=Path(run_folder))


def _salt(salt_file: str | None, run_folders: Sequence[Path | None], environ: Mapping[str, str] | None) -> bytes:
    path = salt_path(salt_file, environ)
    resolved = path.resolve()
    for folder in run_folders:
        if folder is not None and resolved.is_relative_to(Path(folder).resolve()):
            raise TrackingError(f"pseudonymisation salt {path} is inside the run folder {folder}; keep it outside, "
                                "where logs and shared runs never carry it")
    return load_or_create_salt(path)


def _warn(what: str, exc: BaseException) -> None:
    text = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    warnings.warn(f"W&B tracking failed while {what} ({reason}); the run goes on without tracking",
                  TrackingWarning, stacklevel=3)


def _artifact_name(name: str) -> str:
    # W&B artifact names allow letters, digits, '-', '_' and '.'.
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{name}-model").strip("-.") or "milhema-model"


def _plain(value: Any) -> Any:
    """JSON-friendly copy: numpy scalars to Python numbers, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
