"""The training loop: AdamW, warm-up + cosine schedule, class weights, clipping, early stopping.

Model selection uses the validation loss on the inner validation split of the training
patients; the test fold is never looked at.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from tqdm.auto import tqdm

from milhema.settings import LossSettings, Settings
from milhema.train import distributed
from milhema.train.data import PatientBag, as_bags, training_loader
from milhema.train.distributed import Ranks
from milhema.train.inference import predict
from milhema.train.model import PatientModel
from milhema.train.survival import concordance


def task_weights(loss: LossSettings, model: PatientModel) -> tuple[float, float]:
    """(classification, survival) loss weights; 0 for a task that is not learned."""
    cls_w = loss.classification_weight if loss.has_classification else 0.0
    surv_w = loss.survival_weight if loss.has_survival and model.survival is not None else 0.0
    return cls_w, surv_w


def task_loss(model: PatientModel, out: Any, y: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
              weights: torch.Tensor | None, cls_w: float, surv_w: float) -> torch.Tensor:
    """Weighted sum of cross-entropy (patients with a label) and the survival loss (patients with follow-up).

    A model with several streams (``out.stream_logits``) is trained with the mean of their
    cross-entropies, each stream on its own (DSMIL).
    """
    loss = out.logits.float().sum() * 0.0
    if cls_w > 0 and bool((y >= 0).any()):
        streams = out.stream_logits or (out.logits,)
        ce = sum(F.cross_entropy(s.float(), y, weight=weights, ignore_index=-1) for s in streams) / len(streams)
        loss = loss + cls_w * ce
    if surv_w > 0 and model.survival is not None:
        loss = loss + surv_w * model.survival.loss(out.survival.float(), time, event)
    return loss


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (K · n_k)`` (1 for absent classes); labels < 0 are ignored."""
    labels = labels[labels >= 0]
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def batch_hard_triplet(embedding: torch.Tensor, y: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on L2-normalised bag embeddings ``[B, E]``."""
    z = F.normalize(embedding, dim=1)
    dist = torch.cdist(z, z)
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    positive = (same & ~eye).any(1) & (~same).any(1)
    if not positive.any():
        return embedding.sum() * 0.0
    hardest_pos = dist.masked_fill(~same | eye, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin)[positive].mean()


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class _BestEpoch:
    """Early stopping on the validation loss: the weights of the best epoch so far, and whether
    ``patience`` epochs have passed without a better one."""

    def __init__(self, model: PatientModel, patience: int) -> None:
        self.model, self.patience = model, patience
        self.loss, self.stale = math.inf, 0
        self.state = copy.deepcopy(model.state_dict())

    def stop(self, val_loss: float) -> bool:
        """Record an epoch's validation loss; True once training should stop."""
        if val_loss < self.loss - 1e-4:
            self.loss, self.stale, self.state = val_loss, 0, copy.deepcopy(self.model.state_dict())
            return False
        self.stale += 1
        return self.stale >= self.patience


def fit(model: PatientModel, train: Sequence[PatientBag], val: Sequence[PatientBag], settings: Settings, *,
        device: torch.device, log: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False, desc: str = "train", ranks: Ranks | None = None,
        seed: int | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch (of
    the last epoch when ``val`` is empty).

    Under ``torchrun`` (``ranks`` of several processes) each rank steps through its share of the
    batches of ``train.batch_size`` bags, DDP averages the gradients, and validation is gathered
    so that every rank stops at the same epoch. ``seed`` (default ``train.seed``) draws the
    dropout masks, batches and cell subsamples.

    Returns the per-epoch history (train/validation loss, validation balanced accuracy and
    c-index where they apply, lr).
    """
    t, data = settings.train, settings.data
    ranks = ranks or Ranks()
    seed = t.seed if seed is None else seed
    torch.manual_seed(seed)
    model.to(device)
    train = as_bags(train)
    weights = class_weights(train.labels, len(data.classes)).to(device) if settings.loss.class_weights else None
    loader, sampler = training_loader(train, t.batch_size, data.max_cells, seed, ranks=ranks,
                                      workers=data.workers, pin_memory=device.type == "cuda",
                                      bucketing=t.bucketing)
    net = distributed.wrap(model, ranks, device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps = len(sampler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(steps * t.epochs, steps * t.warmup_epochs))
    use_amp = t.amp and device.type == "cuda"
    triplet = settings.loss.triplet_weight
    cls_w, surv_w = task_weights(settings.loss, model)
    best = _BestEpoch(model, t.patience) if len(val) else None   # None: train.val_fraction 0
    history = []
    bar = tqdm(range(t.epochs), desc=desc, unit="epoch", disable=None if progress else True, leave=False)
    for epoch in bar:
        model.train()
        sampler.epoch = epoch
        total, seen = 0.0, 0
        for cpu_batch in loader:
            batch = cpu_batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = net(batch)
                loss = task_loss(model, out, batch.y, batch.time, batch.event, weights, cls_w, surv_w)
                if triplet > 0 and bool((batch.y >= 0).all()):
                    loss = loss + triplet * batch_hard_triplet(out.embedding.float(), batch.y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimiser.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch.y)
            seen += len(batch.y)
        if ranks.active:  # the mean training loss over all ranks' batches
            total, seen = map(sum, zip(*distributed.gather((total, seen), ranks), strict=True))
        scores = evaluate(model, val, settings, device=device, weights=weights, ranks=ranks) if best is not None else {}
        record = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), **scores, "lr": scheduler.get_last_lr()[0]}
        history.append(record)
        if log is not None:
            log(record)
        bar.set_postfix(train=f"{record['train_loss']:.3f}", **({"val": f"{scores['val_loss']:.3f}"} if best is not None else {}))
        if best is not None and best.stop(scores["val_loss"]):
            break
    if best is not None:
        model.load_state_dict(best.state)
    return history


@torch.no_grad()
def evaluate(model: PatientModel, bags: Sequence[PatientBag], settings: Settings, *, device: torch.device,
             weights: torch.Tensor | None = None, ranks: Ranks | None = None) -> dict[str, float]:
    """Validation loss (the training objective on whole bags), balanced accuracy and c-index where
    they apply: ``{"val_loss", "val_balanced_accuracy"?, "val_c_index"?}``."""
    cls_w, surv_w = task_weights(settings.loss, model)
    if not bags:
        return {"val_loss": math.nan}
    bags = as_bags(bags)
    pred = predict(model, bags, settings.train.batch_size, device=device, ranks=ranks)
    y = torch.from_numpy(bags.labels)
    time = torch.from_numpy(bags.times).float()
    event = torch.from_numpy(bags.events).float()
    loss = torch.zeros(())
    scores: dict[str, float] = {}
    labelled = y >= 0
    if cls_w > 0 and bool(labelled.any()):
        logp = torch.log(torch.from_numpy(pred.probs).float().clamp_min(1e-8))
        loss = loss + cls_w * F.nll_loss(logp[labelled], y[labelled], weight=None if weights is None else weights.cpu())
        with warnings.catch_warnings():  # a small validation split may lack a class: expected, not news
            warnings.simplefilter("ignore")
            scores["val_balanced_accuracy"] = float(balanced_accuracy_score(y[labelled].numpy(),
                                                                            pred.probs[labelled.numpy()].argmax(1)))
    if surv_w > 0 and model.survival is not None and pred.survival_out is not None and pred.risk is not None:
        surv = model.survival.loss(torch.from_numpy(pred.survival_out).float().to(device), time.to(device),
                                   event.to(device))
        loss = loss + surv_w * surv.cpu()
        scores["val_c_index"] = concordance(time.numpy().astype(float), event.numpy().astype(float), pred.risk)
    return {"val_loss": float(loss), **scores}
