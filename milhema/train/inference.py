"""Inference: a trained :class:`PatientModel` applied to whole bags.

Shared by training (validation, test folds), ``milhema predict`` and ``milhema explain``, so that
none of them imports another's orchestration: predictions of patients and of their single
slides, and occlusion (each cell's effect on the predicted probabilities).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from milhema.models import MILOutput
from milhema.train import distributed
from milhema.train.data import Batch, PatientBag, as_bags, bucketed_batches, collate
from milhema.train.distributed import Ranks
from milhema.train.model import PatientModel


@dataclass
class Prediction:
    """Outputs for a list of bags, in input order.

    ``cell_scores[i]`` is ``[n_i]`` for bag i; ``class_cell_scores[i]`` is ``[n_i, K]`` or None.
    With a survival head, ``risk`` is ``[n]`` (higher = event sooner) and ``survival_out`` the head's
    raw output ``[n, K]``; without one they are NaN and None.
    """

    probs: np.ndarray
    cell_scores: list[np.ndarray]
    class_cell_scores: list[np.ndarray | None]
    risk: np.ndarray | None = None
    survival_out: np.ndarray | None = None


@dataclass
class FoldPredictions:
    """One model's predictions for a list of patients: of each patient's whole bag, and of each of
    its slides alone (``slide_ids`` / ``slide_patient`` in the order of ``slide``)."""

    patient_ids: list[str]
    patient: Prediction
    slide_ids: list[str]
    slide_patient: list[str]
    slide: Prediction


@torch.no_grad()
def predict(model: PatientModel, bags: Sequence[PatientBag], batch_size: int, *, device: torch.device,
            ranks: Ranks | None = None) -> Prediction:
    """Class probabilities and per-cell scores of whole bags.

    A model with ``eval_subsample`` (``data.eval_subsample: K``) reports for each bag the mean
    probabilities (and survival outputs) of K subsamples of ``data.max_cells`` cells, the inputs it
    was trained on; its cell scores are still those of the whole bag.

    Always in float32, even inside a caller's autocast: bf16 rounds attention logits so coarsely
    that hundreds of cells share a score (a probe on bf16 evaluation found 148-327 distinct
    scores among 400 cells), and the cell ranking is what a hematologist reads.

    With ``ranks`` of several processes each rank predicts every ``world``-th batch and the
    results are gathered, so every rank returns the full :class:`Prediction`.
    """
    ranks = ranks or Ranks()
    model.eval().to(device)
    bags = as_bags(bags)
    head = model.survival
    mine: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None, float, np.ndarray | None]] = {}
    for idx in distributed.shard_eval(list(bucketed_batches(bags.lengths, batch_size, None)), ranks):
        group = [bags[i] for i in idx]
        with torch.autocast(device.type, enabled=False):
            out = model(collate(group).to(device))
        scores = out.cell_scores.float().cpu().numpy()
        cls = out.class_cell_scores.float().cpu().numpy() if out.class_cell_scores is not None else None
        if model.eval_subsample is None:
            p, raw, risk = _outputs(model, out)
        else:  # the mean over subsampled passes; the cell scores above stay those of the whole bag
            draws, cells = model.eval_subsample
            passes = []
            for draw in range(draws):
                with torch.autocast(device.type, enabled=False):
                    passes.append(_outputs(model, model(collate([subsample(b, cells, draw) for b in group]).to(device))))
            p = np.mean([q for q, _, _ in passes], axis=0)
            raw, risk = _mean([r for _, r, _ in passes]), _mean([r for _, _, r in passes])
        for row, i in enumerate(idx):
            n = int(bags.lengths[i])
            mine[i] = (p[row], scores[row, :n], None if cls is None else cls[row, :n],
                       math.nan if risk is None else float(risk[row]), None if raw is None else raw[row])
    results: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None, float, np.ndarray | None]] = {}
    for part in distributed.gather(mine, ranks):
        results |= part
    n_classes = model.mil.n_classes
    order = range(len(bags))
    probs = np.array([results[i][0] for i in order], np.float64).reshape(len(bags), n_classes)
    raw_out = (None if head is None else
               np.array([results[i][4] for i in order], np.float64).reshape(len(bags), head.linear.out_features))
    return Prediction(probs, [results[i][1] for i in order], [results[i][2] for i in order],
                      np.array([results[i][3] for i in order], np.float64), raw_out)


def _outputs(model: PatientModel, out: MILOutput) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Calibrated probabilities ``[B, K]``, raw survival output and risk ``[B]`` (None without a survival head)."""
    p = torch.softmax(out.logits.float() / model.temperature, dim=1).cpu().numpy()
    head = model.survival
    if head is None or out.survival is None:
        return p, None, None
    surv = out.survival.float()
    return p, surv.cpu().numpy(), head.risk(surv).cpu().numpy()


def _mean(parts: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Element-wise mean of the passes' outputs; None for an output the model does not have."""
    arrays = [a for a in parts if a is not None]
    return np.mean(arrays, axis=0) if arrays else None


def subsample(bag: PatientBag, cells: int, draw: int) -> PatientBag:
    """Evaluation subsample ``draw`` of ``cells`` cells of ``bag`` (the whole bag if it has no more).

    Drawn from the bag's identity (patient, slides, size) and ``draw``, not from a global state, so
    a patient gets the same subsamples in cv, in ``predict`` and in any batch or process.
    """
    if bag.n_cells <= cells:
        return bag
    key = zlib.crc32("\x00".join([bag.patient_id, *bag.slide_ids]).encode("utf-8"))
    rng = np.random.default_rng([key, bag.n_cells, draw])
    return bag.cells(np.sort(rng.choice(bag.n_cells, cells, replace=False)))


def predict_patients(model: PatientModel, bags: Sequence[PatientBag], batch_size: int, device: torch.device,
                     ranks: Ranks | None = None) -> FoldPredictions:
    """Patient-bag and single-slide predictions of ``bags``."""
    slides = [(bag, i) for bag in bags for i in range(len(bag.slide_ids))]
    return FoldPredictions(
        patient_ids=[b.patient_id for b in bags],
        patient=predict(model, bags, batch_size, device=device, ranks=ranks),
        slide_ids=[bag.slide_ids[i] for bag, i in slides],
        slide_patient=[bag.patient_id for bag, _ in slides],
        slide=predict(model, [bag.slide(i) for bag, i in slides], batch_size, device=device, ranks=ranks),
    )


@torch.inference_mode()
def occlusion(model: PatientModel, bag: PatientBag, device: torch.device, chunk: int = 64) -> np.ndarray:
    """``[N, K]``: probability of each class with the whole bag minus without cell i.

    Cell i is removed through the padding mask, so every model family (attention, transformer,
    graph, mean-pool) sees a bag without it. ``chunk`` copies of the bag, each missing a different
    cell, go through the model at once: memory ``chunk · N · D`` floats per forward pass.
    """
    n = bag.n_cells
    batch = collate([bag]).to(device)
    full = torch.softmax(model(batch).logits.float() / model.temperature, dim=1)[0]   # [K]
    out = np.zeros((n, full.numel()), np.float64)
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(n, start + chunk), device=device)
        c = len(idx)
        mask = batch.mask.expand(c, -1).clone()
        mask[torch.arange(c, device=device), idx] = False                   # copy j lacks cell start + j
        copies = Batch(batch.x.expand(c, -1, -1).contiguous(), mask, batch.cbc.expand(c, -1).contiguous(),
                       batch.coords.expand(c, -1, -1).contiguous(), batch.view.expand(c, -1).contiguous(),
                       batch.y.expand(c).contiguous(), np.repeat(batch.index, c, axis=0),
                       batch.time.expand(c).contiguous(), batch.event.expand(c).contiguous(),
                       batch.slide.expand(c, -1).contiguous())
        probs = torch.softmax(model(copies).logits.float() / model.temperature, dim=1)   # [c, K]
        out[start:start + c] = (full[None] - probs).cpu().numpy()
    return out
