"""Run configuration: defaults, YAML files, ``--set key=value`` overrides and validation.

A config file is a nested mapping with the sections of :data:`DEFAULTS`; files only need the keys
they change. Unknown keys are refused with the closest valid key, so a typo never silently falls
back to a default, and model parameters are checked against the chosen model. What passes becomes
a typed, frozen :class:`~milhema.settings.Settings`.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from milhema.errors import ConfigError, did_you_mean, first_line
from milhema.models import FUSION_MODES, check_params, create_model, list_models
from milhema.settings import Settings

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        # Class names in the order of the model's outputs; labels in patients.csv must be one of them.
        "classes": ["AML", "MDS", "VEXAS", "reactive"],
        # Numeric columns of patients.csv the model reads beside the cells, fused as set by
        # `fusion`: the CBC (units as in docs/DOMAIN.md: G/L, g/dL, fL) and any other patient-level
        # value (an imported differential count such as pb_myeloblast, say). [] = cells only.
        "patient_features": ["wbc", "hb", "mcv", "plt", "anc", "alc", "amc"],
        # Those that span orders of magnitude (WBC 0.5-300 G/L) are log-transformed first; a name
        # here that patient_features does not list is ignored.
        "log_features": ["wbc", "plt", "anc", "alc", "amc"],
        # Views for multi-view models; null = the distinct values of slides.csv's `view` column.
        "views": None,
        # Feature blocks of the bags to use, e.g. [morphology] or ["timm/resnet18"]; null = all.
        "feature_blocks": None,
        # Training subsamples each bag to this many cells per step (evaluation uses whole bags):
        # on small cohorts the subsampling is a strong augmentation (see docs/RESULTS.md). Bags of
        # 1,000+ cells whose diagnostic cells are rarer than 1 %: 512 did better (RESULTS.md, rare witnesses).
        "max_cells": 128,
        # Evaluation (validation, test folds, predict): 0 = each bag whole; K > 0 = the mean of K
        # predictions of `max_cells`-cell subsamples, the inputs training saw (cell scores still
        # come from the whole bag). See docs/RESULTS.md for which model families gain from it.
        "eval_subsample": 0,
        "standardize_features": True,
        # true: every bag is read from disk once and kept in memory; false: bags are streamed from
        # their HDF5 files at every access (cohorts larger than RAM train in bounded memory).
        "cache": True,
        # Processes reading and batching training bags (0 = the training process itself); each
        # opens the bag files it needs once. Worth it with `cache: false` and spare cores.
        "workers": 0,
    },
    "model": {
        "name": "abmil",
        "hidden_dim": 128,
        "dropout": 0.25,
    },
    "fusion": {"mode": "concat"},
    "loss": {
        # What is learned: [classification], [survival] (time-to-event from patients.csv time/event)
        # or both; a single name may be written without brackets.
        "task": ["classification"],
        "class_weights": True,
        "triplet_weight": 0.0,
        "classification_weight": 1.0,
        "survival_weight": 1.0,
        # cox: partial likelihood of a log-risk score; discrete: hazards over time bins (NLL).
        "survival": "cox",
        "survival_bins": 8,
    },
    "train": {
        "epochs": 150,
        "lr": 2.0e-3,
        "weight_decay": 1.0e-4,
        "batch_size": 16,
        "warmup_epochs": 2,
        "grad_clip": 1.0,
        "patience": 40,
        # true: batches of bags of similar length (little padding); false: batches drawn at random.
        # A Cox loss ranks the patients of one batch only, so bucketing also decides who is compared
        # with whom (see milhema/train/survival.py: cox_loss).
        "bucketing": True,
        "val_fraction": 0.2,
        "seed": 0,
        "device": "auto",
        "amp": True,
    },
    "cv": {
        "folds": 5,
        "repeats": 1,
        # Faithfulness (bags with `diagnostic` truth): occlusion costs a forward pass per cell, so it
        # is measured on this many test patients (spread over the folds); 0 = attention only.
        "occlusion_patients": 40,
    },
    "cells": {
        # `milhema cells train|predict`: a cell-type classifier on the bags' frozen features, trained on
        # annotated cells (the bags' cell_types), and a multi-label head for anomaly attributes.
        # The cell types it learns, in the order of its outputs (the columns of cell_type_probs).
        "types": ["neutrophil", "band", "lymphocyte", "monocyte", "eosinophil", "basophil", "blast", "blast_auer",
                  "promyelocyte", "hypogranular_neutrophil", "pseudo_pelger", "vacuolated_neutrophil",
                  "vacuolated_monocyte", "reactive_lymphocyte", "smudge"],
        # Annotated names read as one of `types`, e.g. {band: neutrophil, "Neutrophil segmented": neutrophil}.
        # Any other name is counted and reported as unknown and left out of training, never guessed.
        "merge": {},
        # Anomaly attributes the multi-label head learns (0/1 columns of cells.csv); null = every one
        # the annotated bags carry; [] = no anomaly head.
        "attributes": None,
        # Types counted as neutrophils: anomaly rates are given among them (differential.csv); a name
        # merged into another type counts as that type.
        "neutrophil_types": ["neutrophil", "band", "hypogranular_neutrophil", "pseudo_pelger",
                             "vacuolated_neutrophil"],
        # mlp: one hidden layer of hidden_dim (GELU, dropout); linear: a linear probe. The MLP was better
        # on both feature sets of docs/RESULTS.md (morphology: balanced accuracy 0.92 vs 0.87).
        "head": "mlp",
        "hidden_dim": 256,
        "dropout": 0.1,
        "epochs": 100,
        "lr": 3.0e-3,
        "weight_decay": 1.0e-4,
        "batch_size": 512,
        # Early stopping: epochs without a better validation loss.
        "patience": 15,
        # Share of each fold's training patients held out (whole patients) for early stopping and calibration.
        "val_fraction": 0.2,
        # Patient-grouped folds: metrics are out of fold; predict gives each training patient's
        # cells the model that held the patient out.
        "folds": 5,
        # Cross-entropy weighted by inverse type frequency (rare types count as much as common ones).
        "class_weights": True,
        # Feature blocks of the bags to use (e.g. [morphology]); null = all.
        "feature_blocks": None,
        # Loss of the anomaly head: asymmetric (ASL, Ridnik et al. 2021) or focal (binary focal loss).
        "attribute_loss": "asymmetric",
        "gamma_neg": 4.0,
        "gamma_pos": 0.0,
        # ASL's probability margin: negatives predicted below it cost nothing.
        "clip": 0.05,
        "seed": 0,
        "device": "auto",
    },
    "tracking": {
        # offline: a local W&B run in <run>/wandb/ to upload later with `wandb sync`; online; disabled.
        # A WANDB_MODE environment variable of offline or disabled makes it more private, never less.
        "mode": "offline",
        "project": "milhema",
        "entity": None,
        # null = the run folder's name.
        "group": None,
        "tags": [],
        # Patient and slide ids reach W&B only as keyed hashes (milhema.privacy).
        "pseudonymize": True,
        # The secret key of those hashes; null = $MILHEMA_SALT_FILE, else ~/.config/milhema/salt.
        "salt_file": None,
        "log_images": False,
        # Upload the model checkpoints (weights + JSON with pseudonymised patient lists) as an artifact.
        "log_checkpoint": False,
    },
}

# Sections whose extra keys are passed on to a component that validates them itself
# (model hyper-parameters differ by model family).
_OPEN_SECTIONS = frozenset({"model"})
# Keys whose value is a mapping of free names (not a section of fixed keys): updated, never checked as keys.
_MAPPING_KEYS = frozenset({"cells.merge"})
_HEADS = ("linear", "mlp")
_ATTRIBUTE_LOSSES = ("asymmetric", "focal")
# Keys that were renamed: configs and run folders written before still load, with a warning.
_RENAMED = {"data.cbc_columns": "data.patient_features", "data.cbc_log_columns": "data.log_features"}

# Class names become file names (gallery_<class>.png) and CSV columns (prob_<class>).
_SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,99}$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_MAX_SEED = 2**32 - 1   # numpy, torch and scikit-learn all accept seeds up to here


class _DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one mapping: YAML would silently keep the last one."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys, so an edit never hides a forgotten line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _value in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise _DuplicateKeyError(f"key {key_node.value!r} appears twice (line {key_node.start_mark.line + 1})")
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


# The YAML constructor raises ValueError for impossible dates (2024-13-01) and recursion errors
# for absurdly deep nesting; both are bad input, not bugs.
_YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


def default_config() -> dict[str, dict[str, Any]]:
    """A fresh deep copy of :data:`DEFAULTS`."""
    return copy.deepcopy(DEFAULTS)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Settings:
    """Defaults, updated by the YAML file at ``path``, then by ``key.sub=value`` overrides.

    Raises:
        ConfigError: unreadable file, unknown key, a value of the wrong type or an impossible one.
    """
    config = default_config()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read it ({exc.strerror})") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
        try:
            loaded = _load_yaml(text)
        except _YAML_ERRORS as exc:
            raise ConfigError(f"config {path}: not valid YAML ({first_line(exc)})") from exc
        merge_into(config, _sections(loaded, f"config {path}"), source=str(path))
    for item in overrides:
        key, value = parse_override(item)
        merge_into(config, _nest(key, value), source=f"--set {item}")
    validate_values(config)
    return Settings.from_dict(config)


def settings_from_mapping(loaded: Any, source: str) -> Settings:
    """Settings from an already parsed config (a run folder's ``config.yaml``): defaults, then ``loaded``.

    Raises:
        ConfigError: as :func:`load_config`, with ``source`` naming where the mapping came from.
    """
    config = default_config()
    merge_into(config, _sections(loaded, source), source=source)
    validate_values(config)
    return Settings.from_dict(config)


def _sections(loaded: Any, source: str) -> Mapping[str, Any]:
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(loaded).__name__}")
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.001")
    if not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: {key.strip()!r} has an empty part; write section.key, e.g. train.lr")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except _YAML_ERRORS as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({first_line(exc)})") from exc
    return key.strip(), value


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)


def merge_into(config: dict[str, Any], update: Mapping[str, Any], *, source: str, prefix: str = "") -> None:
    """Update ``config`` in place with ``update``, refusing unknown keys and wrong types."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} is not a string")
        if dotted in _RENAMED:
            new = _RENAMED[dotted]
            warnings.warn(f"{source}: '{dotted}' is now called '{new}'; read as such", FutureWarning, stacklevel=2)
            key, dotted = new.rpartition(".")[2], new
        if key not in config:
            section = prefix.rstrip(".")
            if section in _OPEN_SECTIONS:
                config[key] = value
                continue
            valid = ", ".join(sorted(config))
            raise ConfigError(f"{source}: unknown key '{dotted}'{did_you_mean(key, config, prefix=prefix)}; "
                              f"valid keys here: {valid}")
        current = config[key]
        if dotted in _MAPPING_KEYS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping of names, e.g. {{band: neutrophil}}, "
                                  f"got {value!r}")
            config[key] = {**current, **value}   # a file's names, then --set's, added to the defaults'
            continue
        if isinstance(current, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping of keys, got {value!r}")
            merge_into(current, value, source=source, prefix=f"{dotted}.")
            continue
        if dotted == "loss.task" and isinstance(value, str):
            value = [value]
        config[key] = _checked(value, current, dotted, source)


def _checked(value: Any, default: Any, dotted: str, source: str) -> Any:
    if default is None:
        return value
    if value is None:
        raise ConfigError(f"{source}: '{dotted}' cannot be empty (null); give a value, or remove the line to keep "
                          f"the default {default!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{dotted}' must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        return _number(value, default, dotted, source)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{dotted}' must be a list, e.g. [a, b], got {value!r}")
        return value
    if isinstance(default, str) and isinstance(value, str):
        return value
    raise ConfigError(f"{source}: '{dotted}' must be {type(default).__name__}, got {value!r}")


def _number(value: Any, default: int | float, dotted: str, source: str) -> int | float:
    """``value`` as the type of ``default``; finite. Text like ``1e-3`` is a number too (YAML 1.1 reads it as text)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = value
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{source}: '{dotted}' must be {type(default).__name__}, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{source}: '{dotted}' must be a finite number, got {value!r}")
    if isinstance(default, int):
        if isinstance(number, float) and not number.is_integer():
            raise ConfigError(f"{source}: '{dotted}' must be a whole number, got {value!r}")
        return int(number)
    return float(number)


def validate_values(config: Mapping[str, Any]) -> None:
    """Checks that go beyond types: values that are impossible whatever the file says."""
    _validate_data(config["data"])
    _validate_loss(config["loss"])
    _validate_train(config["train"])
    _at_least(config["cv"], "cv", {"occlusion_patients": 0, "folds": 2, "repeats": 1})
    _check_model(config["model"], config["fusion"], config["data"])
    _validate_cells(config["cells"])
    _validate_tracking(config["tracking"])


def _validate_data(data: Mapping[str, Any]) -> None:
    classes = data["classes"]
    _check_names("data.classes", classes, allow_empty_list=False)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"data.classes must list at least two distinct class names, got {classes}")
    unsafe = [c for c in classes if not _SAFE_NAME.match(c)]
    if unsafe:
        raise ConfigError(f"data.classes: class name {unsafe[0]!r} cannot be used in file names "
                          "(no '/', '\\', control characters, or leading '.')")
    for key in ("patient_features", "log_features"):
        _check_names(f"data.{key}", data[key], allow_empty_list=True)
    if data["views"] is not None:
        _check_names("data.views", data["views"], allow_empty_list=False, null_hint=True)
    features = data["patient_features"]
    if len(set(features)) != len(features):
        raise ConfigError(f"data.patient_features lists a column twice: {features}")
    # Only a name that is neither a patient feature nor one of the default counts is a typo.
    unknown_log = [c for c in data["log_features"] if c not in features and c not in DEFAULTS["data"]["log_features"]]
    if unknown_log:
        raise ConfigError(f"data.log_features names {unknown_log[0]!r}, which data.patient_features does not list"
                          f"{did_you_mean(unknown_log[0], features)}")
    blocks = data["feature_blocks"]
    if blocks is not None and (not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) for b in blocks)):
        raise ConfigError(f"data.feature_blocks must be null or a list of block names like [morphology], got {blocks!r}")
    _at_least(data, "data", {"max_cells": 1, "workers": 0, "eval_subsample": 0})


def _validate_loss(loss: Mapping[str, Any]) -> None:
    tasks = loss["task"]
    if (not all(isinstance(t, str) for t in tasks) or not tasks or len(set(tasks)) != len(tasks)
            or not set(tasks) <= {"classification", "survival"}):
        raise ConfigError(f"loss.task must be classification, survival or [classification, survival], got {tasks!r}")
    if loss["survival"] not in ("cox", "discrete"):
        raise ConfigError(f"loss.survival must be cox or discrete, got {loss['survival']!r}")
    _at_least(loss, "loss", {"survival_bins": 2, "classification_weight": 0.0, "survival_weight": 0.0,
                             "triplet_weight": 0.0})


def _validate_train(train: Mapping[str, Any]) -> None:
    _at_least(train, "train", {"epochs": 1, "batch_size": 1, "patience": 1, "warmup_epochs": 0,
                               "weight_decay": 0.0, "seed": 0})
    if not 0.0 < train["lr"] < 1.0:
        raise ConfigError(f"train.lr must be between 0 and 1, got {train['lr']}")
    if not 0.0 <= train["val_fraction"] < 0.5:
        raise ConfigError(f"train.val_fraction must be at least 0 and below 0.5 (0: no validation split, train for "
                          f"train.epochs epochs), got {train['val_fraction']}")
    if train["grad_clip"] <= 0:
        raise ConfigError(f"train.grad_clip must be greater than 0 (the largest gradient norm), got {train['grad_clip']}")
    if train["seed"] > _MAX_SEED:
        raise ConfigError(f"train.seed must be at most {_MAX_SEED}, got {train['seed']}")
    if not _DEVICE.match(train["device"]):
        raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {train['device']!r}")


def _validate_cells(cells: Mapping[str, Any]) -> None:
    types = cells["types"]
    _check_names("cells.types", types, allow_empty_list=False)
    if len(types) < 2 or len(set(types)) != len(types):
        raise ConfigError(f"cells.types must list at least two distinct cell types, got {types}")
    merge = cells["merge"]
    if not all(isinstance(k, str) and k.strip() and isinstance(v, str) for k, v in merge.items()):
        raise ConfigError(f"cells.merge must map annotated names to cell types, e.g. {{band: neutrophil}}, got {merge!r}")
    wrong = [v for v in merge.values() if v not in types]
    if wrong:
        raise ConfigError(f"cells.merge maps to {wrong[0]!r}, which cells.types does not list"
                          f"{did_you_mean(wrong[0], types)}")
    merged_away = [k for k in merge if k in types and merge[k] != k]
    if merged_away:
        raise ConfigError(f"cells.merge maps {merged_away[0]!r} to {merge[merged_away[0]]!r}, but {merged_away[0]!r} is "
                          "itself one of cells.types; remove it from cells.types to merge it")
    attributes = cells["attributes"]
    if attributes is not None:
        _check_names("cells.attributes", attributes, allow_empty_list=True, null_hint=True)
        if len(set(attributes)) != len(attributes):
            raise ConfigError(f"cells.attributes lists a name twice: {attributes}")
    _check_names("cells.neutrophil_types", cells["neutrophil_types"], allow_empty_list=True)
    outside = [t for t in cells["neutrophil_types"] if t not in types and t not in merge]
    if outside:
        raise ConfigError(f"cells.neutrophil_types names {outside[0]!r}, which cells.types does not list"
                          f"{did_you_mean(outside[0], types)}")
    if cells["head"] not in _HEADS:
        raise ConfigError(f"cells.head must be {' or '.join(_HEADS)}, got {cells['head']!r}"
                          f"{did_you_mean(str(cells['head']), _HEADS)}")
    if cells["attribute_loss"] not in _ATTRIBUTE_LOSSES:
        raise ConfigError(f"cells.attribute_loss must be {' or '.join(_ATTRIBUTE_LOSSES)}, "
                          f"got {cells['attribute_loss']!r}")
    blocks = cells["feature_blocks"]
    if blocks is not None and (not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) for b in blocks)):
        raise ConfigError(f"cells.feature_blocks must be null or a list of block names like [morphology], got {blocks!r}")
    _at_least(cells, "cells", {"hidden_dim": 1, "epochs": 1, "batch_size": 1, "patience": 1, "folds": 2,
                               "weight_decay": 0.0, "seed": 0, "gamma_neg": 0.0, "gamma_pos": 0.0, "clip": 0.0})
    if not 0.0 <= cells["dropout"] < 1.0 or not 0.0 < cells["lr"] < 1.0 or not 0.0 < cells["val_fraction"] < 0.5:
        raise ConfigError("cells.dropout must be in [0, 1), cells.lr in (0, 1) and cells.val_fraction in (0, 0.5); "
                          f"got {cells['dropout']}, {cells['lr']}, {cells['val_fraction']}")
    if cells["clip"] >= 1.0 or cells["seed"] > _MAX_SEED:
        raise ConfigError(f"cells.clip must be below 1 and cells.seed at most {_MAX_SEED}")
    if not _DEVICE.match(cells["device"]):
        raise ConfigError(f"cells.device must be auto, cpu, cuda, cuda:N or mps, got {cells['device']!r}")


def _validate_tracking(tracking: Mapping[str, Any]) -> None:
    mode = tracking["mode"]
    if mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"tracking.mode must be offline, online or disabled, got {mode!r}")
    if not tracking["project"].strip():
        raise ConfigError("tracking.project must be a name, got an empty string")
    for key in ("entity", "group", "salt_file"):
        value = tracking[key]
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"tracking.{key} must be null or a non-empty string, got {value!r}")
    if not all(isinstance(tag, str) and tag for tag in tracking["tags"]):
        raise ConfigError(f"tracking.tags must be a list of non-empty strings, got {tracking['tags']!r}")


def _at_least(section: Mapping[str, Any], name: str, minimum: Mapping[str, float]) -> None:
    for key, low in minimum.items():
        if section[key] < low:
            raise ConfigError(f"{name}.{key} must be at least {low}, got {section[key]}")


def _check_names(key: str, value: Any, *, allow_empty_list: bool, null_hint: bool = False) -> None:
    """A list of distinct non-empty strings (class, column or view names)."""
    ok = isinstance(value, list) and (allow_empty_list or value) and all(isinstance(v, str) and v.strip() for v in value)
    if not ok:
        alternative = " or null" if null_hint else ""
        raise ConfigError(f"{key} must be a list of non-empty names, e.g. [a, b]{alternative}, got {value!r}")


def _check_model(model: Mapping[str, Any], fusion: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """The model, its parameters and the fusion mode, checked here so a typo fails before any bag is read.

    The model is built once on a toy input size (on the meta device: no memory), so a value its
    constructor refuses (``k: 0``) fails now too; the global random state is left as it was.
    """
    name, mode = model["name"], fusion["mode"]
    if not isinstance(name, str) or name not in list_models(aliases=True):
        raise ConfigError(f"model.name {name!r} is not one of {', '.join(list_models())}"
                          f"{did_you_mean(str(name), list_models(aliases=True), cutoff=0.5)}")
    if mode not in FUSION_MODES:
        raise ConfigError(f"fusion.mode {mode!r} is not one of {', '.join(FUSION_MODES)}"
                          f"{did_you_mean(mode, FUSION_MODES, cutoff=0.5)}")
    params = {k: v for k, v in model.items() if k != "name"}
    check_params(name, params)
    # On the meta device nothing is allocated: a huge hidden_dim is checked, not built.
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            create_model(name, in_dim=8, n_classes=len(data["classes"]), cbc_dim=4 if data["patient_features"] else 0,
                         fusion=mode, **params)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:   # sizes torch cannot even describe
        raise ConfigError(f"model {name}: these parameters do not build a model ({first_line(exc)[:120]}); "
                          f"check model.* values such as hidden_dim ({model.get('hidden_dim')!r})") from exc


def dump_config(settings: Settings) -> str:
    """YAML text of resolved settings (as written to a run folder's ``config.yaml``)."""
    return yaml.safe_dump(settings.to_dict(), sort_keys=False)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out
