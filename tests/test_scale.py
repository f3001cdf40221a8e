"""Scale: bags streamed from HDF5 (``data.cache: false``), loader workers, and DDP under torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import CLASSES, _config, planted_cohort

from milhema.data import load_cohort
from milhema.train.data import BagStore, EpochSampler, TrainingBags
from milhema.train.distributed import Ranks, shard
from milhema.train.run import run_train


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return planted_cohort(tmp_path_factory.mktemp("planted"))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "model.safetensors"))


def test_streamed_and_worker_loaded_training_equal_the_cached_run(planted, tmp_path: Path) -> None:
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    runs = {"cached": [], "streamed": ["data.cache=false"], "workers": ["data.cache=false", "data.workers=2"]}
    for name, extra in runs.items():
        run_train(_config("train.epochs=4", "data.max_cells=16", *extra), cohort, planted[1], tmp_path / name,
                  progress=False)
    reference = _weights(tmp_path / "cached")
    history = (tmp_path / "cached" / "history.jsonl").read_text()
    for name in ("streamed", "workers"):
        other = _weights(tmp_path / name)
        assert all(torch.equal(reference[k], other[k]) for k in reference), name
        assert (tmp_path / name / "history.jsonl").read_text() == history


def test_store_caches_once_or_streams_with_bounded_open_files(planted) -> None:
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    ids = cohort.patient_ids[:6]
    cached = BagStore(cohort, planted[1], ["PB", "BM"], cache=True)
    assert cached.get(ids[0]) is cached.get(ids[0])
    streamed = BagStore(cohort, planted[1], ["PB", "BM"], cache=False, max_open=2)
    first, again = streamed.get(ids[1]), streamed.get(ids[1])
    assert first is not again and np.array_equal(first.features, again.features)
    seq = streamed.many(ids)
    assert seq.lengths.tolist() == [b.n_cells for b in seq]
    assert seq.labels.tolist() == cohort.labels(ids).tolist()
    assert len(streamed._files) <= 2  # P01/P03/P05 have two slides each: more files than handles kept
    assert not streamed._cached
    streamed.close()
    assert not streamed._files


def test_epoch_sampler_gives_each_rank_an_equal_disjoint_share() -> None:
    lengths = np.arange(10, 33)  # 23 bags, batches of 4 -> 6 batches
    whole = [b for b in EpochSampler(lengths, 4, None, seed=3)]
    assert sorted(i for b in whole for _, i in b) == list(range(23))
    shares = [list(EpochSampler(lengths, 4, None, seed=3, ranks=Ranks(r, 4))) for r in range(4)]
    assert {len(s) for s in shares} == {2}  # 6 batches over 4 ranks: wrapped to 8
    seen = [i for s in shares for b in s for _, i in b]
    assert set(seen) == set(range(23))
    assert shard(list("abcde"), Ranks(1, 2)) == ["b", "d", "a"] and shard(list("abcde"), Ranks(0, 2)) == ["a", "c", "e"]
    later = EpochSampler(lengths, 4, None, seed=3, epoch=1)
    assert [b for b in later] != whole


def test_training_bags_subsample_the_same_cells_wherever_loaded(planted) -> None:
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    bags = BagStore(cohort, planted[1], ["PB", "BM"]).many(cohort.patient_ids)
    a, b = TrainingBags(bags, 8, seed=0), TrainingBags(bags, 8, seed=0)
    assert np.array_equal(a[(2, 5)].features, b[(2, 5)].features) and a[(2, 5)].n_cells == 8
    assert not np.array_equal(a[(2, 5)].cell_ids, a[(3, 5)].cell_ids)


def test_torchrun_two_cpu_processes_train_one_run(planted, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (gloo): both ranks train in lockstep, rank 0 writes one run folder."""
    config = tmp_path / "ddp.yaml"
    config.write_text("data: {classes: [healthy, disease], patient_features: [wbc, hb], log_features: [wbc]}\n"
                      "train: {epochs: 30, batch_size: 4, lr: 0.003, patience: 40}\ncv: {folds: 3}\n")
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "milhema", "cv", "--config", str(config), "--cohort", str(planted[0]), "--bags", str(planted[1]),
           "--out", str(runs / "cv"), "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in runs.iterdir()] == ["cv"]  # one folder, no scratch or partial left
    metrics = json.loads((runs / "cv" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["n_patients"] == 24
    with open(runs / "cv" / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 24
    history = [json.loads(line) for line in (runs / "cv" / "history.jsonl").read_text().splitlines()]
    assert {(h["fold"], h["epoch"]) for h in history} == {(k, e) for k in range(3) for e in range(1, 31)}
    assert done.stdout.count("3-fold cv") == 1  # rank 0 reports, rank 1 stays quiet
    assert metrics["patient"]["macro_auroc"]["mean"] > 0.9  # it learns the planted cells like one process
