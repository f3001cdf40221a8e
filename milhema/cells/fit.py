"""Training one cell classifier: patient-grouped splits, early stopping, calibration.

Splits never cut a patient: the cells of one patient are in one part only (their cells share a
stain, a smear and a disease), and the types are balanced between parts as far as whole patients
allow (scikit-learn's ``StratifiedGroupKFold``). Each model stops early on the validation loss of
a held-out share of its training patients, then is calibrated on the same validation cells:

* **types**: the class-balanced loss trains the model on a world where every type is equally
  common; the prior correction ``-log w_t`` (``w`` the class weights) brings its logits back to the
  training frequencies, the temperature is fitted as for patients (:func:`milhema.train.calibration.fit_temperature`),
  then a small per-type bias for the types with at least 10 validation cells (bias-corrected
  temperature scaling, Alexandari et al. 2020): expected counts ``sum_i p[i, t]``, the differential,
  are only right with calibrated probabilities.
* **attributes**: Platt scaling per attribute (a scale and a shift of the logit), which undoes the
  asymmetric loss's distortion; identity when the validation cells lack a positive or a negative.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from milhema.cells.annotations import AnnotatedCells
from milhema.cells.losses import asymmetric_loss, class_weights, focal_loss
from milhema.cells.model import CellClassifier
from milhema.errors import MilhemaError
from milhema.settings import CellsSettings
from milhema.train.calibration import fit_temperature
from milhema.train.metrics import balanced_accuracy

MIN_BIAS_CELLS = 10   # validation cells of a type needed to fit its calibration bias


def grouped_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train rows, test rows)`` of ``k`` folds: no group (patient) on both sides, ``y`` stratified as groups allow.

    A single group is a dataset without patients (a class-folder collection of single-cell images):
    its cells are split stratified by type, as scikit-learn's ``StratifiedKFold``.
    """
    n_groups = len(set(groups.tolist()))
    if n_groups == 1:
        with warnings.catch_warnings():   # a type with fewer than k cells cannot be in every fold
            warnings.simplefilter("ignore")
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
            return [(np.asarray(a), np.asarray(b)) for a, b in splitter.split(np.zeros(len(y)), y)]
    if n_groups < k:
        raise MilhemaError(f"{n_groups} patients have annotated cells: too few for {k} patient-grouped folds "
                           f"(set cells.folds, or --folds, to at most {n_groups}; at least 2)")
    with warnings.catch_warnings():   # a type rarer than k patients cannot be in every fold: expected
        warnings.simplefilter("ignore")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return [(np.asarray(a), np.asarray(b)) for a, b in splitter.split(np.zeros(len(y)), y, groups)]


def without_patients(cells: AnnotatedCells) -> bool:
    """All annotated cells come from one patient: a dataset without patients, split by cell."""
    return len(set(cells.patients.tolist())) == 1


def validation_split(cells: AnnotatedCells, rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` split into inner training and validation rows, whole patients, about ``fraction`` of them held out."""
    groups = cells.patients[rows]
    n_groups = len(set(groups.tolist()))
    if n_groups < 2 and without_patients(cells):
        inner, val = grouped_folds(cells.y[rows], groups, max(2, round(1 / fraction)), seed)[0]
        return rows[inner], rows[val]
    if n_groups < 2:
        raise MilhemaError("a fold's training cells come from one patient: early stopping needs at least two "
                           "(annotate more patients, or lower cells.folds)")
    k = min(max(2, round(1 / fraction)), n_groups)
    inner, val = grouped_folds(cells.y[rows], groups, k, seed)[0]
    return rows[inner], rows[val]


def classifier_spec(cells: AnnotatedCells, settings: CellsSettings) -> dict[str, Any]:
    """What builds a :class:`CellClassifier` for these cells and settings (also what its JSON records)."""
    return {"head": settings.head, "in_dim": cells.features.shape[1], "hidden_dim": settings.hidden_dim,
            "dropout": settings.dropout, "types": list(cells.types), "attributes": list(cells.attribute_names),
            "neutrophil_types": list(settings.neutrophils)}


def fit_classifier(cells: AnnotatedCells, train: np.ndarray, val: np.ndarray, settings: CellsSettings,
                   device: torch.device, seed: int,
                   log: Callable[[dict[str, Any]], None] | None = None) -> tuple[CellClassifier, list[dict[str, Any]]]:
    """Train on the cells at ``train`` (row indices), stop early on ``val``, calibrate on ``val``.

    Returns the calibrated model (on the CPU) and one record per epoch.
    """
    torch.manual_seed(seed)
    model = CellClassifier(classifier_spec(cells, settings))
    model.fit_standardisation(cells.features[train])
    model.to(device)
    n_types = len(cells.types)
    weights = class_weights(cells.y[train], n_types) if settings.class_weights else torch.ones(n_types)
    data = {part: _tensors(cells, rows, device) for part, rows in (("train", train), ("val", val))}
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=settings.epochs)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, waited, history = math.inf, copy.deepcopy(model.state_dict()), 0, []
    for epoch in range(settings.epochs):
        train_loss = _epoch(model, data["train"], weights.to(device), settings, optimiser, generator)
        schedule.step()
        val_loss, val_ba = _evaluate(model, data["val"], weights.to(device), settings)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_balanced_accuracy": val_ba}
        history.append(record)
        if log is not None:
            log(record)
        if val_loss < best - 1e-6:
            best, best_state, waited = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited >= settings.patience:
                break
    model.load_state_dict(best_state)
    model.cpu().eval()
    counts = np.bincount(cells.y[train], minlength=n_types)
    model.type_prior.copy_(torch.as_tensor(counts / max(counts.sum(), 1), dtype=torch.float32))
    calibrate(model, cells.features[val], cells.y[val], cells.attributes[val], weights if settings.class_weights else None)
    return model, history


MIN_STEPS = 16   # optimiser steps per epoch at least: a small training set is cut into smaller batches


def batch_size(n: int, configured: int) -> int:
    """``cells.batch_size``, or smaller so that an epoch of ``n`` cells has at least :data:`MIN_STEPS` steps
    (a few hundred annotated cells would otherwise give one step per epoch and barely train)."""
    return max(1, min(configured, -(-n // MIN_STEPS)))


def _tensors(cells: AnnotatedCells, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(cells.features[rows]).to(device), torch.from_numpy(cells.y[rows]).to(device),
            torch.from_numpy(cells.attributes[rows].astype(np.int64)).to(device))


def _loss(model: CellClassifier, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, weights: torch.Tensor,
          settings: CellsSettings) -> tuple[torch.Tensor, torch.Tensor]:
    logits, attr = model(x)
    loss = F.cross_entropy(logits, y, weight=weights)
    if attr is not None:
        if settings.attribute_loss == "focal":
            loss = loss + focal_loss(attr, a, settings.gamma_neg)
        else:
            loss = loss + asymmetric_loss(attr, a, settings.gamma_neg, settings.gamma_pos, settings.clip)
    return loss, logits


def _epoch(model: CellClassifier, data: tuple[torch.Tensor, ...], weights: torch.Tensor, settings: CellsSettings,
           optimiser: torch.optim.Optimizer, generator: torch.Generator) -> float:
    model.train()
    x, y, a = data
    order = torch.randperm(len(y), generator=generator).to(x.device)
    total = 0.0
    size = batch_size(len(y), settings.batch_size)
    for start in range(0, len(y), size):
        rows = order[start:start + size]
        loss, _ = _loss(model, x[rows], y[rows], a[rows], weights, settings)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += float(loss.detach()) * len(rows)
    return total / max(len(y), 1)


@torch.no_grad()
def _evaluate(model: CellClassifier, data: tuple[torch.Tensor, ...], weights: torch.Tensor,
              settings: CellsSettings) -> tuple[float, float]:
    """Validation loss (class-weighted, as in training) and balanced accuracy."""
    model.eval()
    x, y, a = data
    loss, logits = _loss(model, x, y, a, weights, settings)
    pred = logits.argmax(dim=1).cpu().numpy()
    return float(loss), balanced_accuracy(y.cpu().numpy(), pred, logits.shape[1])


@torch.no_grad()
def calibrate(model: CellClassifier, features: np.ndarray, y: np.ndarray, attributes: np.ndarray,
              weights: torch.Tensor | None) -> None:
    """Fit the model's calibration buffers on validation cells ``features [V, D]``, ``y [V]``, ``attributes [V, A]``."""
    logits, attr = model(torch.from_numpy(np.asarray(features, np.float32)))
    prior = torch.zeros(logits.shape[1])
    if weights is not None:   # a type absent from training (weight 0) has no frequency to return to
        prior = torch.where(weights > 0, -torch.log(weights.clamp(min=1e-12)), prior)
    shifted = (logits + prior).numpy().astype(np.float64)
    temperature = fit_temperature(_softmax(shifted), y)
    bias = _type_bias(shifted / temperature, y)
    model.temperature.fill_(temperature)
    model.type_bias.copy_(torch.as_tensor(prior.numpy() / temperature + bias, dtype=torch.float32))
    if attr is not None:
        for j in range(attr.shape[1]):
            scale, shift = _platt(attr[:, j].numpy().astype(np.float64), attributes[:, j])
            model.attribute_scale[j], model.attribute_shift[j] = scale, shift


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _type_bias(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-type biases minimising the NLL of ``softmax(z + b)`` (types with few validation cells keep 0)."""
    k = z.shape[1]
    fitted = np.bincount(y, minlength=k) >= MIN_BIAS_CELLS
    if len(y) == 0 or fitted.sum() < 2:
        return np.zeros(k)
    onehot = np.eye(k)[y]

    def nll(b: np.ndarray) -> tuple[float, np.ndarray]:
        p = _softmax(z + _expand(b, fitted))
        value = -float(np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)))) + 1e-3 * float(b @ b)
        grad = (p - onehot).mean(axis=0)[fitted] + 2e-3 * b
        return value, grad

    best = minimize(nll, np.zeros(int(fitted.sum())), jac=True, method="L-BFGS-B",
                    bounds=[(-5.0, 5.0)] * int(fitted.sum()))
    return _expand(best.x, fitted)


def _expand(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    full = np.zeros(len(where))
    full[where] = values
    return full


def _platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Scale and shift of the logit ``z [V]`` minimising the BCE against ``y`` (1, 0; -1 ignored); (1, 0) if undefined."""
    known = y >= 0
    z, t = z[known], y[known].astype(np.float64)
    if len(t) == 0 or t.min() == t.max():
        return 1.0, 0.0

    def nll(params: np.ndarray) -> tuple[float, np.ndarray]:
        s = params[0] * z + params[1]
        p = 1 / (1 + np.exp(-s))
        value = float(np.mean(np.logaddexp(0, s) - t * s)) + 1e-4 * float(params[0] ** 2)
        residual = p - t
        return value, np.array([np.mean(residual * z) + 2e-4 * params[0], np.mean(residual)])

    best = minimize(nll, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(0.01, 100.0), (-50.0, 50.0)])
    return float(best.x[0]), float(best.x[1])
