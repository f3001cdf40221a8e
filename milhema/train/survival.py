"""Time-to-event learning: survival heads and losses, concordance, Kaplan–Meier risk groups and
the CBC-only Cox baseline.

Times are in the unit of ``patients.csv`` (the simulator writes months); ``event`` is 1 for an
observed event and 0 for censoring; a patient without follow-up has NaN for both and is left out
of every survival term. A *risk* is larger for a patient expected to have the event sooner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

SURVIVAL_KINDS = ("cox", "discrete")


class SurvivalHead(nn.Module):
    """Reads a bag embedding ``[B, E]`` and returns raw survival outputs.

    ``cox``: ``[B, 1]`` log-risk. ``discrete``: ``[B, K]`` logits of the hazard in each of the K time
    bins given by ``edges`` (K + 1 increasing times; the first is 0, the last +inf), stored as a
    buffer so a checkpoint carries its own bins.
    """

    edges: Tensor

    def __init__(self, kind: str, in_dim: int, edges: Sequence[float] | None = None) -> None:
        super().__init__()
        if kind not in SURVIVAL_KINDS:
            raise ValueError(f"survival head must be one of {SURVIVAL_KINDS}, got {kind!r}")
        self.kind = kind
        n_bins = 1
        if kind == "discrete":
            if edges is None or len(edges) < 3:
                raise ValueError("a discrete-time head needs at least 3 bin edges")
            n_bins = len(edges) - 1
        self.register_buffer("edges", torch.tensor(list(edges or [0.0, math.inf]), dtype=torch.float32))
        self.linear = nn.Linear(in_dim, n_bins)

    def forward(self, embedding: Tensor) -> Tensor:
        return self.linear(embedding)

    def risk(self, out: Tensor) -> Tensor:
        """``[B]`` risk from :meth:`forward`'s output: the log-risk, or minus the expected number of
        bins survived (discrete), so that both rank patients the same way."""
        if self.kind == "cox":
            return out[:, 0]
        survival = torch.cumprod(1.0 - torch.sigmoid(out), dim=1)
        return -survival.sum(dim=1)

    def loss(self, out: Tensor, time: Tensor, event: Tensor) -> Tensor:
        """Mean loss over patients with follow-up (``time`` not NaN); 0 when there are none to learn from."""
        known = ~torch.isnan(time)
        if self.kind == "cox":
            return cox_loss(out[known, 0], time[known], event[known])
        return discrete_time_nll(out[known], bin_index(time[known], self.edges), event[known])


def time_bin_edges(times: np.ndarray, events: np.ndarray, n_bins: int) -> list[float]:
    """Bin edges at quantiles of the observed event times (``n_bins`` bins, first edge 0, last +inf)."""
    observed = np.asarray(times, float)[(np.asarray(events) == 1) & np.isfinite(times)]
    if observed.size < n_bins:
        observed = np.asarray(times, float)[np.isfinite(times)]
    if observed.size == 0:
        raise ValueError("no follow-up times to place survival bins")
    inner = np.unique(np.quantile(observed, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
    return [0.0, *[float(x) for x in inner if x > 0], math.inf]


def bin_index(time: Tensor, edges: Tensor) -> Tensor:
    """Index of the bin holding each time: ``edges[k] <= t < edges[k + 1]`` → k."""
    return (torch.bucketize(time.contiguous(), edges[1:-1].contiguous(), right=True)).long()


def cox_loss(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood (Breslow ties) per event.

    risk, time, event: ``[n]``. Each event at time t contributes ``risk_i − log Σ_{t_j ≥ t} exp(risk_j)``.
    Returns 0 (with a gradient path) when the batch has no event: such a batch carries no ranking.

    In training the ``n`` patients are one mini-batch, so the risk sets hold only the patients of
    that batch (a stochastic approximation of the full partial likelihood, as in DeepSurv-style
    training): a patient is compared only with the others drawn into its batch. Larger batches
    (``train.batch_size``) give larger risk sets. Length-bucketed batches (``train.bucketing:
    true``, the default) put bags of similar cell counts together, so when the number of cells
    goes with the outcome the risk sets are not random samples of the cohort;
    ``train.bucketing: false`` draws each batch at random (docs/RESULTS.md measures both).
    """
    n_events = event.sum()
    if risk.numel() == 0 or float(n_events) == 0:
        return risk.sum() * 0.0
    at_risk = time[None, :] >= time[:, None]                        # [i, j]: j still at risk at t_i
    log_denominator = torch.logsumexp(risk[None, :].masked_fill(~at_risk, -math.inf), dim=1)
    return -((risk - log_denominator) * event).sum() / n_events


def discrete_time_nll(logits: Tensor, index: Tensor, event: Tensor) -> Tensor:
    """Negative log-likelihood of a logistic-hazard model, mean over patients.

    logits ``[n, K]`` hazard logits; index ``[n]`` bin of each time; event ``[n]``. A patient with the
    event in bin j survived bins < j and had it in j; a censored one survived bins ≤ j.
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    k = torch.arange(logits.shape[1], device=logits.device)[None, :]
    target = ((k == index[:, None]) & (event[:, None] > 0)).float()
    seen = (k <= index[:, None]).float()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * seen).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C of ``risk`` (higher = sooner) via lifelines; NaN with fewer than 2 usable patients."""
    from lifelines.utils import concordance_index

    keep = np.isfinite(time) & np.isfinite(risk)
    if keep.sum() < 2 or event[keep].sum() == 0:
        return math.nan
    return float(concordance_index(time[keep], -risk[keep], event[keep]))


def concordance_summary(time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, n_boot: int = 500,
                        seed: int = 0) -> dict[str, object]:
    """C-index with a patient-bootstrap 95 % CI: ``{"mean", "ci95": [lo, hi], "n", "events"}``.

    ``risk`` is ``[P]``, or ``[R, P]`` for R repeats of out-of-fold risks: then ``mean`` is the
    mean c-index over the repeats, ``ci95`` the bootstrap interval of that mean (each resample of
    patients scored in every repeat) and ``per_repeat`` the repeats' values.
    """
    risks = np.atleast_2d(np.asarray(risk, dtype=float))
    keep = np.isfinite(time) & np.isfinite(risks).all(axis=0)
    t, e, rs = time[keep], event[keep], risks[:, keep]
    values = [concordance(t, e, r) for r in rs]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if len(t) >= 2 else 0):
        idx = rng.integers(0, len(t), len(t))
        c = float(np.mean([concordance(t[idx], e[idx], r[idx]) for r in rs]))
        if not math.isnan(c):
            boots.append(c)
    ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else [math.nan, math.nan]
    out: dict[str, object] = {"mean": float(np.mean(values)), "ci95": ci, "n": int(len(t)), "events": int(e.sum())}
    if len(rs) > 1:
        out["per_repeat"] = values
    return out


def risk_groups(risk: np.ndarray, n_groups: int = 3) -> np.ndarray:
    """Group of each patient by quantile of risk: 0 = lowest risk … n_groups − 1 = highest."""
    ranks = np.argsort(np.argsort(risk, kind="stable"), kind="stable")
    return (ranks * n_groups // max(len(risk), 1)).astype(int)


def kaplan_meier_plot(time: np.ndarray, event: np.ndarray, risk: np.ndarray, path: Path,
                      title: str = "Kaplan–Meier by predicted risk tertile") -> float:
    """Save Kaplan–Meier curves of the risk tertiles to ``path`` (PNG); return the log-rank p-value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    keep = np.isfinite(time) & np.isfinite(risk)
    t, e, r = time[keep], event[keep], risk[keep]
    groups = risk_groups(r)
    p_value = float(multivariate_logrank_test(t, groups, e).p_value) if len(set(groups)) > 1 else math.nan
    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=120)
    names = ("low risk", "intermediate risk", "high risk")
    for g in range(3):
        sel = groups == g
        if sel.any():
            KaplanMeierFitter().fit(t[sel], e[sel], label=f"{names[g]} (n={int(sel.sum())})").plot_survival_function(
                ax=ax, ci_show=True)
    ax.set_xlabel("time (months)")
    ax.set_ylabel("event-free probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}\nlog-rank p = {p_value:.2g}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return p_value


def cbc_cox_risk(x_train: np.ndarray, time_train: np.ndarray, event_train: np.ndarray,
                 x_test: np.ndarray, penalizer: float = 0.1) -> np.ndarray:
    """Risk of the test patients from a lifelines Cox model on the CBC alone (the baseline).

    Missing values are imputed with the training median and columns standardised on the training
    patients; a ridge penalty keeps the fit stable on small folds.
    """
    import pandas as pd
    from lifelines import CoxPHFitter

    keep = np.isfinite(time_train)
    x_train, time_train, event_train = x_train[keep], time_train[keep], event_train[keep]
    median = np.nanmedian(np.where(np.isfinite(x_train), x_train, np.nan), axis=0)
    median = np.where(np.isfinite(median), median, 0.0)

    def impute(x: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(x), x, median)

    xt, xs = impute(x_train), impute(x_test)
    mu, sd = xt.mean(axis=0), xt.std(axis=0)
    use = sd > 1e-9
    xt, xs = (xt[:, use] - mu[use]) / sd[use], (xs[:, use] - mu[use]) / sd[use]
    columns = [f"c{j}" for j in range(xt.shape[1])]
    frame = pd.DataFrame(xt, columns=columns)
    frame["T"], frame["E"] = time_train, event_train
    model = CoxPHFitter(penalizer=penalizer).fit(frame, "T", "E")
    return np.asarray(model.predict_log_partial_hazard(pd.DataFrame(xs, columns=columns))).reshape(-1)
