"""Issue 18 items 9 and 10: subsampled evaluation (data.eval_subsample) and batches without
length bucketing (train.bucketing), behind config keys whose defaults keep the old behaviour."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import CLASSES, _config, planted_cohort

from milhema.config import load_config
from milhema.data import load_cohort
from milhema.errors import ConfigError
from milhema.train.checkpoint import load_checkpoint
from milhema.train.cv import run_cv
from milhema.train.data import BagStore, EpochSampler, bucketed_batches
from milhema.train.inference import predict, subsample
from milhema.train.predict import run_predict


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return planted_cohort(tmp_path_factory.mktemp("eval_modes"))


def test_defaults_keep_whole_bags_and_bucketing() -> None:
    settings = load_config(None)
    assert settings.data.eval_subsample == 0 and settings.train.bucketing is True
    with pytest.raises(ConfigError, match="eval_subsample must be at least 0"):
        load_config(None, ["data.eval_subsample=-1"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, ["train.bucketing=sometimes"])


def test_batches_without_bucketing_are_random_draws() -> None:
    lengths = np.array([5, 500] * 40)           # alternating short and long bags
    bucketed = list(bucketed_batches(lengths, 8, np.random.default_rng(0), max_cells=None))
    plain = list(bucketed_batches(lengths, 8, np.random.default_rng(0), max_cells=None, bucketing=False))
    for batches in (bucketed, plain):
        assert sorted(i for b in batches for i in b) == list(range(80))
    # Bucketed batches hold bags of one length; random ones mix them.
    assert all(len(set(lengths[b].tolist())) == 1 for b in bucketed)
    assert sum(len(set(lengths[b].tolist())) > 1 for b in plain) >= 8
    # The sampler passes the choice on, and stays a function of (seed, epoch).
    sampler = EpochSampler(lengths, 8, None, seed=3, bucketing=False)
    first = list(sampler)
    assert first == list(EpochSampler(lengths, 8, None, seed=3, bucketing=False))
    assert any(len({lengths[i] for _, i in batch}) > 1 for batch in first)


def test_cv_trains_without_bucketing(planted, tmp_path: Path) -> None:
    config = _config("train.bucketing=false", "train.epochs=30", "cv.occlusion_patients=0")
    cohort = load_cohort(planted[0], config.data.classes, config.data.patient_features)
    metrics = run_cv(config, cohort, planted[1], tmp_path / "plain", progress=False)
    assert metrics["patient"]["balanced_accuracy"]["mean"] > 0.7


def test_subsampled_evaluation_is_the_mean_of_its_draws(planted, tmp_path: Path) -> None:
    config = _config("data.eval_subsample=4", "data.max_cells=16", "train.epochs=20", "cv.occlusion_patients=0")
    cohort = load_cohort(planted[0], config.data.classes, config.data.patient_features)
    out = tmp_path / "sub"
    metrics = run_cv(config, cohort, planted[1], out, progress=False)
    assert metrics["patient"]["balanced_accuracy"]["mean"] > 0.6
    model, meta = load_checkpoint(out / "checkpoints" / "r0_f0")
    assert model.eval_subsample == (4, 16) and meta["spec"]["eval_subsample"] == {"draws": 4, "cells": 16}
    bags = list(BagStore(cohort, planted[1], meta["spec"]["views"]).many(meta["test_patients"]))
    assert any(b.n_cells > 16 for b in bags)
    cpu = torch.device("cpu")
    sub = predict(model, bags, 3, device=cpu)
    # By hand: the whole-bag model on each draw, averaged.
    model.eval_subsample = None
    by_hand = np.mean([predict(model, [subsample(b, 16, d) for b in bags], 3, device=cpu).probs for d in range(4)],
                      axis=0)
    whole = predict(model, bags, 3, device=cpu)
    np.testing.assert_allclose(sub.probs, by_hand, atol=1e-5)
    assert not np.allclose(sub.probs, whole.probs, atol=1e-4)
    # Cell scores stay those of the whole bag, one per cell.
    for s, w, bag in zip(sub.cell_scores, whole.cell_scores, bags, strict=True):
        assert len(s) == bag.n_cells
        np.testing.assert_allclose(s, w, atol=1e-6)
    # A draw depends on the bag and the draw number only: same cells whichever batch it is in.
    big = next(b for b in bags if b.n_cells > 16)
    assert np.array_equal(subsample(big, 16, 1).cell_ids, subsample(big, 16, 1).cell_ids)
    assert not np.array_equal(subsample(big, 16, 0).cell_ids, subsample(big, 16, 1).cell_ids)
    small = next(b for b in bags if b.n_cells <= 40)
    assert subsample(small, 64, 0) is small
    # predict on the run reads the setting from the checkpoints and reproduces the out-of-fold numbers.
    result = run_predict(out, cohort, planted[1], tmp_path / "pred")
    with open(out / "predictions.csv") as fh:
        oof = {r["patient_id"]: float(r[f"prob_{CLASSES[1]}"]) for r in csv.DictReader(fh)}
    for pid, prob in zip(result["patient_ids"], result["probs"][:, 1], strict=True):
        assert prob == pytest.approx(oof[pid], abs=1e-5)
