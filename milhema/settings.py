"""Typed run settings: what a validated config becomes.

:func:`milhema.config.load_config` reads YAML and ``--set`` overrides into a plain nested dict,
checks every key and value, and returns a :class:`Settings`: one frozen dataclass per config
section. Everything past the command line (training, cross-validation, tracking, run folders)
takes these objects, so a misspelt key is a type error, not a ``KeyError`` in the middle of a run.

:meth:`Settings.to_dict` gives back the plain dict, identical to the validated one (key order,
lists), which is what a run folder's ``config.yaml`` holds and what ``--resume`` fingerprints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class DataSettings:
    """``data``: classes, patient-level inputs, feature selection and how bags are loaded.

    ``patient_features`` are the numeric columns of patients.csv fused with the cells (the CBC,
    imported counts, ...); ``log_features`` those of them that are log-transformed first.
    """

    classes: tuple[str, ...]
    patient_features: tuple[str, ...]
    log_features: tuple[str, ...]
    views: tuple[str, ...] | None
    feature_blocks: tuple[str, ...] | None
    max_cells: int
    eval_subsample: int
    standardize_features: bool
    cache: bool
    workers: int


@dataclass(frozen=True)
class ModelSettings:
    """``model``: a registered model name and its hyper-parameters (checked against that model)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


@dataclass(frozen=True)
class FusionSettings:
    """``fusion``: how the CBC enters the model (:data:`milhema.models.FUSION_MODES`)."""

    mode: str


@dataclass(frozen=True)
class LossSettings:
    """``loss``: the tasks learned and their weights."""

    task: tuple[str, ...]
    class_weights: bool
    triplet_weight: float
    classification_weight: float
    survival_weight: float
    survival: str
    survival_bins: int

    @property
    def has_classification(self) -> bool:
        """Whether the diagnosis is learned."""
        return "classification" in self.task

    @property
    def has_survival(self) -> bool:
        """Whether time-to-event is learned."""
        return "survival" in self.task

    @property
    def task_name(self) -> str | list[str]:
        """``task`` as metrics.json writes it: the name of a single task, else the list."""
        return self.task[0] if len(self.task) == 1 else list(self.task)


@dataclass(frozen=True)
class TrainSettings:
    """``train``: optimiser, schedule, early stopping, seed and device."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    warmup_epochs: int
    grad_clip: float
    patience: int
    bucketing: bool
    val_fraction: float
    seed: int
    device: str
    amp: bool


@dataclass(frozen=True)
class CvSettings:
    """``cv``: folds, repeats and the occlusion budget of the faithfulness check."""

    folds: int
    repeats: int
    occlusion_patients: int


@dataclass(frozen=True)
class CellsSettings:
    """``cells``: the cell-type classifier on frozen bag features (``milhema cells train|predict``).

    ``types`` are its outputs in order; ``merge`` maps annotated names to one of them (any other
    name is unknown: counted, never guessed); ``attributes`` are the anomaly attributes of the
    multi-label head (None = every one the annotations carry, ``()`` = no head).
    """

    types: tuple[str, ...]
    merge: Mapping[str, str]
    attributes: tuple[str, ...] | None
    neutrophil_types: tuple[str, ...]
    head: str
    hidden_dim: int
    dropout: float
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    patience: int
    val_fraction: float
    folds: int
    class_weights: bool
    feature_blocks: tuple[str, ...] | None
    attribute_loss: str
    gamma_neg: float
    gamma_pos: float
    clip: float
    seed: int
    device: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "merge", MappingProxyType(dict(self.merge)))

    def type_of(self, name: str) -> str | None:
        """The cell type an annotated ``name`` is (itself, or through ``merge``), or None if unknown."""
        if name in self.types:
            return name
        return self.merge.get(name)

    @property
    def neutrophils(self) -> tuple[str, ...]:
        """The types among :attr:`types` that count as neutrophils (``neutrophil_types`` through ``merge``)."""
        found = {self.type_of(name) for name in self.neutrophil_types}
        return tuple(t for t in self.types if t in found)


@dataclass(frozen=True)
class TrackingSettings:
    """``tracking``: the W&B run and pseudonymisation (see :mod:`milhema.tracking`)."""

    mode: str
    project: str
    entity: str | None
    group: str | None
    tags: tuple[str, ...]
    pseudonymize: bool
    salt_file: str | None
    log_images: bool
    log_checkpoint: bool


_SECTIONS: dict[str, type] = {
    "data": DataSettings, "model": ModelSettings, "fusion": FusionSettings, "loss": LossSettings,
    "train": TrainSettings, "cv": CvSettings, "cells": CellsSettings, "tracking": TrackingSettings,
}


@dataclass(frozen=True)
class Settings:
    """A validated config, one typed section per attribute."""

    data: DataSettings
    model: ModelSettings
    fusion: FusionSettings
    loss: LossSettings
    train: TrainSettings
    cv: CvSettings
    cells: CellsSettings
    tracking: TrackingSettings

    @classmethod
    def from_dict(cls, config: Mapping[str, Mapping[str, Any]]) -> Settings:
        """Settings from a config dict that :func:`milhema.config.validate_values` accepted."""
        sections: dict[str, Any] = {}
        for name, kind in _SECTIONS.items():
            raw = dict(config[name])
            if kind is ModelSettings:
                sections[name] = ModelSettings(raw.pop("name"), raw)
                continue
            sections[name] = kind(**{f.name: _frozen(raw[f.name]) for f in dataclasses.fields(kind)})
        return cls(**sections)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The plain config dict (lists, not tuples), as written to a run's ``config.yaml``."""
        out: dict[str, dict[str, Any]] = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            if isinstance(section, ModelSettings):
                out[name] = {"name": section.name, **{k: _thawed(v) for k, v in section.params.items()}}
            else:
                out[name] = {f.name: _thawed(getattr(section, f.name)) for f in dataclasses.fields(section)}
        return out


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _thawed(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_thawed(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    return value
