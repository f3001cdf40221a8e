"""Survival: losses against independent references, concordance, simulated follow-up, cv end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from milhema.bags import write_bag
from milhema.config import load_config
from milhema.data import load_cohort
from milhema.errors import ConfigError, MilhemaError
from milhema.synth.cohort import _plan
from milhema.synth.composition import DiseaseState
from milhema.synth.outcome import log_hazard_ratio, sample_follow_up
from milhema.train.checkpoint import load_checkpoint
from milhema.train.cv import run_cv
from milhema.train.predict import run_predict
from milhema.train.run import run_train
from milhema.train.survival import (
    SurvivalHead,
    bin_index,
    concordance,
    concordance_summary,
    cox_loss,
    discrete_time_nll,
    time_bin_edges,
)


def test_cox_loss_equals_lifelines_partial_likelihood() -> None:
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(3)
    n = 60
    x = rng.normal(size=n)
    time = rng.exponential(1.0 / np.exp(0.8 * x)) + rng.uniform(0, 1e-3, n)   # no ties
    event = (rng.random(n) < 0.7).astype(float)
    fitted = CoxPHFitter().fit(pd.DataFrame({"x": x, "T": time, "E": event}), "T", "E")
    beta = float(fitted.params_["x"])
    # lifelines centres covariates; the partial likelihood does not change with a shift of all risks.
    ours = -cox_loss(torch.tensor(beta * x), torch.tensor(time), torch.tensor(event)) * event.sum()
    assert float(ours) == pytest.approx(fitted.log_likelihood_, rel=1e-6)
    # And beta is where our loss is smallest.
    losses = [float(cox_loss(torch.tensor(b * x), torch.tensor(time), torch.tensor(event)))
              for b in (beta - 0.1, beta, beta + 0.1)]
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_cox_loss_ties_and_empty_batches() -> None:
    risk = torch.tensor([0.5, -0.2, 1.0], requires_grad=True)
    time = torch.tensor([2.0, 2.0, 5.0])
    event = torch.tensor([1.0, 1.0, 0.0])
    loss = cox_loss(risk, time, event)
    denominator = math.log(sum(math.exp(r) for r in (0.5, -0.2, 1.0)))   # Breslow: both tied events see all 3
    assert float(loss.detach()) == pytest.approx(-((0.5 - denominator) + (-0.2 - denominator)) / 2)
    no_event = cox_loss(risk, time, torch.zeros(3))
    assert float(no_event.detach()) == 0.0
    no_event.backward()   # still part of the graph
    assert risk.grad is not None


def test_discrete_time_nll_handles_censoring() -> None:
    logits = torch.tensor([[0.2, -0.5, 1.0], [0.2, -0.5, 1.0]])
    h = torch.sigmoid(logits[0])
    index = torch.tensor([1, 1])
    event = torch.tensor([1.0, 0.0])
    loss = discrete_time_nll(logits, index, event)
    had_event = -torch.log(1 - h[0]) - torch.log(h[1])          # survived bin 0, event in bin 1
    censored = -torch.log(1 - h[0]) - torch.log(1 - h[1])       # survived bins 0 and 1, then lost
    assert float(loss) == pytest.approx(float((had_event + censored) / 2), rel=1e-6)
    edges = time_bin_edges(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), np.array([1, 1, 1, 0, 1, 1]), 3)
    assert edges[0] == 0.0 and edges[-1] == math.inf and len(edges) == 4
    bins = bin_index(torch.tensor([0.5, 2.5, 100.0]), torch.tensor(edges, dtype=torch.float32))
    assert bins.tolist()[0] == 0 and bins.tolist()[-1] == 2
    head = SurvivalHead("discrete", 4, edges)
    out = head(torch.randn(5, 4))
    assert out.shape == (5, 3) and head.risk(out).shape == (5,)


def test_concordance_of_a_perfect_risk_is_one() -> None:
    time = np.array([1.0, 3.0, 2.0, 8.0, 5.0])
    event = np.array([1, 1, 0, 1, 1])
    assert concordance(time, event, -time) == pytest.approx(1.0)
    assert concordance(time, event, time) == pytest.approx(0.0)
    assert math.isnan(concordance(time, np.zeros(5), -time))


def test_simulated_follow_up_depends_on_blasts_and_cytopenias() -> None:
    normal_cbc = {"hb": 13.0, "anc": 4.0, "plt": 250.0}
    low = log_hazard_ratio(DiseaseState("AML", 0.2), normal_cbc)
    high = log_hazard_ratio(DiseaseState("AML", 0.8), normal_cbc)
    cytopenic = log_hazard_ratio(DiseaseState("AML", 0.2), {"hb": 8.0, "anc": 0.9, "plt": 40.0})
    assert high > low and cytopenic > low
    assert log_hazard_ratio(DiseaseState("reactive", 0.1), normal_cbc) < log_hazard_ratio(
        DiseaseState("MDS", 0.1), normal_cbc)
    t, e = sample_follow_up(DiseaseState("MDS", 0.3), normal_cbc, np.random.default_rng(1))
    assert t > 0 and e in (0, 1)
    patients, _ = _plan(120, 4, "default", 20, 64, 0.1)
    times = np.array([p["time"] for p in patients])
    events = np.array([p["event"] for p in patients])
    assert (times > 0).all() and set(np.unique(events)) <= {0, 1} and 0.2 < events.mean() < 0.9
    aml = np.array([p["label"] == "AML" for p in patients])
    assert np.median(times[aml & (events == 1)]) < np.median(times[~aml & (events == 1)])


def _survival_cohort(root: Path, n: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """Bags whose fraction of planted cells (feature 0 shifted) sets the hazard; CBC is noise."""
    rng = np.random.default_rng(seed)
    cohort, bags = root / "cohort", root / "bags"
    (cohort / "src").mkdir(parents=True)
    patients = ["patient_id,label,wbc,hb,time,event"]
    slides = ["slide_id,patient_id,source"]
    for i in range(n):
        fraction = rng.uniform(0.0, 0.5)
        label = "disease" if fraction > 0.25 else "healthy"
        # Weibull with shape 4: little spread, so the ranking follows the planted fraction closely.
        event_time = 60.0 * math.exp(-5.0 * fraction) * (-math.log(rng.random())) ** 0.25
        censor = rng.uniform(20.0, 60.0)
        followed = i % 9 != 0   # some patients without follow-up
        time_text = f"{min(event_time, censor):.2f},{int(event_time <= censor)}" if followed else ","
        patients.append(f"P{i:02d},{label},{rng.lognormal(1.8, 0.4):.2f},{rng.normal(12, 2):.1f},{time_text}")
        cells = int(rng.integers(30, 60))
        x = rng.normal(size=(cells, 8)).astype(np.float32)
        planted = rng.random(cells) < fraction
        x[planted, 0] += 3.0
        write_bag(bags / f"P{i:02d}_S0.h5", x, slide_id=f"P{i:02d}_S0", patient_id=f"P{i:02d}",
                  diagnostic=planted, cell_ids=[f"c{j}" for j in range(cells)], backbone="test/planted")
        slides.append(f"P{i:02d}_S0,P{i:02d},src")
    (cohort / "patients.csv").write_text("\n".join(patients) + "\n")
    (cohort / "slides.csv").write_text("\n".join(slides) + "\n")
    return cohort, bags


def _config(*extra: str) -> dict:
    return load_config(None, ["data.classes=[healthy, disease]", "data.patient_features=[wbc, hb]",
                              "data.log_features=[wbc]", "train.epochs=30", "train.batch_size=12",
                              "train.lr=0.003", "train.patience=30", "cv.folds=3", "tracking.mode=disabled",
                              "model.name=meanpool", *extra])


@pytest.fixture(scope="module")
def survival_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _survival_cohort(tmp_path_factory.mktemp("survival"))


def test_survival_cv_end_to_end(survival_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    cohort_dir, bags = survival_cohort
    config = _config("loss.task=survival")
    cohort = load_cohort(cohort_dir, config.data.classes, config.data.patient_features)
    metrics = run_cv(config, cohort, bags, tmp_path / "cox", progress=False)
    survival = metrics["survival"]
    assert metrics["task"] == "survival" and "patient" not in metrics
    assert survival["n_patients"] == 42 and survival["events"] >= 10   # 6 of 48 have no follow-up
    # The planted fraction alone ranks patients at c = 0.82; the CBC is noise.
    assert survival["c_index"]["mean"] > 0.65
    assert survival["c_index"]["mean"] > survival["baselines"]["cbc_cox"]["c_index"]["mean"]
    lo, hi = survival["c_index"]["ci95"]
    assert lo <= survival["c_index"]["mean"] <= hi
    assert 0.0 <= survival["baselines"]["cbc_cox"]["c_index"]["mean"] <= 1.0
    assert 0.0 <= survival["logrank_p"] <= 1.0
    assert (tmp_path / "cox" / "km_risk_groups.png").stat().st_size > 10_000
    with (tmp_path / "cox" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 42 and all(0.0 < float(r["risk"]) <= 1.0 for r in rows)
    history = [json.loads(line) for line in (tmp_path / "cox" / "history.jsonl").read_text().splitlines()]
    assert "val_c_index" in history[0] and "val_balanced_accuracy" not in history[0]


def test_multitask_discrete_run_and_checkpoint(survival_cohort: tuple[Path, Path], tmp_path: Path) -> None:
    cohort_dir, bags = survival_cohort
    config = _config("loss.task=[classification, survival]", "loss.survival=discrete", "loss.survival_bins=4",
                     "train.epochs=60", "train.patience=60")
    cohort = load_cohort(cohort_dir, config.data.classes, config.data.patient_features)
    metrics = run_cv(config, cohort, bags, tmp_path / "multi", progress=False)
    assert metrics["task"] == ["classification", "survival"]
    assert metrics["n_patients"] == 48   # labelled patients; those without follow-up only skip the survival loss
    assert metrics["patient"]["balanced_accuracy"]["mean"] > 0.6
    assert metrics["survival"]["c_index"]["mean"] > 0.6
    model, meta = load_checkpoint(tmp_path / "multi" / "checkpoints" / "r0_f0")
    edges = meta["spec"]["survival"]["edges"]
    assert edges[0] == 0 and edges[-1] == math.inf and len(edges) <= 5
    assert model.survival is not None and model.survival.linear.out_features == len(edges) - 1
    run_predict(tmp_path / "multi", cohort, bags, tmp_path / "predicted")
    with (tmp_path / "predicted" / "predictions.csv").open() as fh:
        predicted = list(csv.DictReader(fh))
    assert len(predicted) == 48 and all(math.isfinite(float(r["risk"])) for r in predicted)
    train = run_train(_config("loss.task=survival"), cohort, bags, tmp_path / "train", progress=False)
    assert "early_stopping_split_survival" in train and "early_stopping_split" not in train


def test_survival_config_and_follow_up_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="loss.task must be"):
        load_config(None, ["loss.task=[survival, survival]"])
    with pytest.raises(ConfigError, match="loss.survival must be cox or discrete"):
        load_config(None, ["loss.survival=weibull"])
    cohort_dir, bags = _survival_cohort(tmp_path, n=6)
    text = (cohort_dir / "patients.csv").read_text().splitlines()
    (cohort_dir / "patients.csv").write_text("\n".join(line.rsplit(",", 2)[0] + ",," if i else line
                                                       for i, line in enumerate(text)) + "\n")
    config = _config("loss.task=survival")
    cohort = load_cohort(cohort_dir, config.data.classes, config.data.patient_features)
    with pytest.raises(MilhemaError, match="survival needs follow-up"):
        run_cv(config, cohort, bags, tmp_path / "run", progress=False)


def test_concordance_over_repeats_is_the_mean_with_its_own_interval() -> None:
    rng = np.random.default_rng(3)
    time = rng.exponential(10.0, 80)
    event = (rng.random(80) < 0.7).astype(float)
    good, noise = -time + rng.normal(0, 2, 80), rng.normal(size=80)
    one = concordance_summary(time, event, good, n_boot=200)
    assert "per_repeat" not in one and one["mean"] == pytest.approx(concordance(time, event, good))
    both = concordance_summary(time, event, np.stack([good, noise]), n_boot=200)
    assert both["per_repeat"] == pytest.approx([concordance(time, event, good), concordance(time, event, noise)])
    assert both["mean"] == pytest.approx(np.mean(both["per_repeat"]))
    lo, hi = both["ci95"]
    assert lo <= both["mean"] <= hi and hi < one["ci95"][0]  # the noisy repeat pulls the whole interval down
