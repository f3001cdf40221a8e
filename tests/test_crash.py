"""Crashes and restarts: real ``milhema`` processes killed with SIGKILL mid-run, then run again.

The killed processes run on one thread (``OMP_NUM_THREADS=1``), and so do the uninterrupted
reference runs in this process (:func:`one_thread`), so their results can be compared bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import EMBED_ARGS, one_thread
from safetensors.torch import load_file

from milhema.bags import read_bag, validate_bag
from milhema.cli import main
from milhema.config import load_config
from milhema.data import load_cohort
from milhema.io import atomic_folder, partial_folder
from milhema.tracking import offline_runs
from milhema.train.cv import run_cv

CV_CONFIG = "train: {epochs: 25, patience: 25, batch_size: 4}\ncv: {folds: 2, repeats: 2}\n"
POLL_S = 0.02
TIMEOUT_S = 240  # a hung process fails the test instead of hanging it


def _start(tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    """``milhema ARGS`` in its own process group, output to files (a full pipe would stall it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp / f"log_{time.monotonic_ns()}"
    return subprocess.Popen([sys.executable, "-m", "milhema", *args], env=env, start_new_session=True,
                            stdout=open(f"{log}.out", "wb"), stderr=open(f"{log}.err", "wb"))  # noqa: SIM115


def _kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    """SIGKILL the process (and its group) as soon as ``ready()``; fail if it ends or stalls first."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ready():
            assert proc.poll() is None, f"milhema ended (status {proc.returncode}) before the kill point"
            assert time.monotonic() < deadline, "no progress on disk before the time limit"
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "milhema finished by itself: the kill came too late"


def _bags(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.h5"))


def test_killed_embed_leaves_only_valid_bags_and_a_rerun_completes(tiny_cohort: Path, tiny_bags: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "bags"
    n_slides = len(_bags(tiny_bags))
    embed = ("embed", "--cohort", str(tiny_cohort), "--out", str(out), *EMBED_ARGS)
    # Killed after its first bag, then (resumed) after a few more: two different moments.
    for more in (1, 4):
        before = len(_bags(out)) if out.exists() else 0
        _kill_when(_start(tmp_path, *embed), lambda before=before, more=more: len(_bags(out)) >= before + more)
        done = _bags(out)
        assert before + more <= len(done) < n_slides
        for path in done:  # nothing under a final name is half written
            assert validate_bag(path)["n_cells"] > 0
    rerun = subprocess.run([sys.executable, "-m", "milhema", *embed], capture_output=True, text=True,
                           timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} finished bags kept" in rerun.stdout
    assert [p.name for p in _bags(out)] == [p.name for p in _bags(tiny_bags)]
    assert not list(out.glob(".*.tmp"))  # temporaries of the killed runs were cleared
    for path in _bags(out):
        resumed, straight = read_bag(path), read_bag(tiny_bags / path.name)
        assert list(resumed.cell_ids) == list(straight.cell_ids)
        np.testing.assert_array_equal(resumed.features, straight.features)
        np.testing.assert_array_equal(resumed.thumbnails, straight.thumbnails)


@pytest.fixture(scope="module")
def cv_args(tiny_cohort: Path, tiny_bags: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    config = tmp_path_factory.mktemp("cv_config") / "cv.yaml"
    config.write_text(CV_CONFIG)
    return ["cv", "--config", str(config), "--cohort", str(tiny_cohort), "--bags", str(tiny_bags), "-q"]


@pytest.fixture(scope="module")
def straight_cv(cv_args: list[str], tiny_cohort: Path, tiny_bags: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted cv run that resumed runs must equal."""
    config = load_config(cv_args[2])
    out = tmp_path_factory.mktemp("straight") / "run"
    with one_thread():
        run_cv(config, load_cohort(tiny_cohort, config.data.classes, config.data.patient_features),
               tiny_bags, out, progress=False)
    return out


@pytest.fixture(scope="module")
def interrupted_cv(cv_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``milhema cv`` killed right after its first fold finished; returns the (never written) run folder."""
    root = tmp_path_factory.mktemp("interrupted")
    out = root / "run"
    first = partial_folder(out) / "folds" / "r0_f0" / "done.json"
    _kill_when(_start(root, *cv_args, "--out", str(out)), first.is_file)
    return out


def _copy_interrupted(interrupted: Path, tmp_path: Path) -> Path:
    out = tmp_path / interrupted.name
    shutil.copytree(partial_folder(interrupted), partial_folder(out), symlinks=True)
    return out


def _run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with one_thread():
        code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _metrics(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("wall_time_s")
    return metrics


def test_killed_cv_resumes_from_its_finished_fold(interrupted_cv: Path, straight_cv: Path, cv_args: list[str],
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy_interrupted(interrupted_cv, tmp_path)
    partial = partial_folder(out)
    assert not out.exists()  # a killed run never looks finished
    assert sorted(p.parent.name for p in partial.glob("folds/*/done.json")) == ["r0_f0"]
    kept = partial / "checkpoints" / "r0_f0.safetensors"
    stamp, weights = kept.stat().st_mtime_ns, load_file(str(kept))
    (partial / ".metrics.json.tmp").write_text("{")  # a file the killed run was writing
    code, stdout, stderr = _run_cli(capsys, *cv_args, "--out", str(out), "--resume")
    assert code == 0, stderr
    assert "resuming the interrupted run" in stdout and "1 finished fold(s) found" in stdout
    assert not partial.exists() and not (out / "folds").exists() and not (out / "resume.json").exists()
    assert not list(out.rglob(".*.tmp"))
    reused = out / "checkpoints" / "r0_f0.safetensors"
    assert reused.stat().st_mtime_ns == stamp  # the finished fold was not trained again
    assert load_file(str(reused)).keys() == weights.keys()
    # Identical to the uninterrupted run: same seeds per fold, same folds, same outputs.
    assert _metrics(out) == _metrics(straight_cv)
    for name in ("predictions.csv", "slide_predictions.csv", "history.jsonl"):
        assert (out / name).read_bytes() == (straight_cv / name).read_bytes(), name
    for path in (straight_cv / "checkpoints").glob("*.safetensors"):
        a, b = load_file(str(path)), load_file(str(out / "checkpoints" / path.name))
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), path.name
    assert sorted(p.name for p in (out / "cell_scores").iterdir()) == sorted(
        p.name for p in (straight_cv / "cell_scores").iterdir())
    # One W&B run: the killed process's half run is replaced by one that replays the finished fold.
    (wandb_run,) = offline_runs(out)
    assert list(wandb_run.glob("run-*.wandb"))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert {(h["repeat"], h["fold"]) for h in history} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_a_finished_fold_that_lost_its_checkpoint_is_trained_again(interrupted_cv: Path, straight_cv: Path,
                                                                  cv_args: list[str], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy_interrupted(interrupted_cv, tmp_path)
    (partial_folder(out) / "checkpoints" / "r0_f0.safetensors").unlink()
    code, _, stderr = _run_cli(capsys, *cv_args, "--out", str(out), "--resume")
    assert code == 0, stderr
    assert (out / "predictions.csv").read_bytes() == (straight_cv / "predictions.csv").read_bytes()


def test_interrupted_cv_needs_resume_or_overwrite(interrupted_cv: Path, cv_args: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy_interrupted(interrupted_cv, tmp_path)
    partial = partial_folder(out)
    code, _, stderr = _run_cli(capsys, *cv_args, "--out", str(out))
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "has 1 finished fold(s); pass --resume to continue it or --overwrite to start again" in stderr
    assert (partial / "folds" / "r0_f0" / "done.json").is_file()  # refused, and nothing was lost
    code, _, stderr = _run_cli(capsys, *cv_args, "--out", str(out), "--resume", "--overwrite")
    assert code == 2 and "pass only one" in stderr
    stamp = (partial / "checkpoints" / "r0_f0.safetensors").stat().st_mtime_ns
    code, _, stderr = _run_cli(capsys, *cv_args, "--out", str(out), "--overwrite")
    assert code == 0, stderr
    assert (out / "checkpoints" / "r0_f0.safetensors").stat().st_mtime_ns != stamp  # started again


def test_resume_refuses_another_config_or_cohort(interrupted_cv: Path, cv_args: list[str], tiny_cohort: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy_interrupted(interrupted_cv, tmp_path)
    code, _, stderr = _run_cli(capsys, *cv_args, "--out", str(out), "--resume", "--set", "train.lr=0.01")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "another config: train.lr was 0.002 and is now 0.01" in stderr
    changed = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, changed)
    patients = (changed / "patients.csv").read_text().splitlines()
    row = patients[1].split(",")
    row[4] = str(float(row[4]) + 1.0)  # one patient's WBC
    (changed / "patients.csv").write_text("\n".join([patients[0], ",".join(row), *patients[2:]]) + "\n")
    args = [a if a != str(tiny_cohort) else str(changed) for a in cv_args]
    code, _, stderr = _run_cli(capsys, *args, "--out", str(out), "--resume")
    assert code == 2 and "the cohort or its bags changed since" in stderr
    assert (partial_folder(out) / "folds" / "r0_f0" / "done.json").is_file()  # kept for a proper resume
    # The tracking section cannot change results: another W&B mode still resumes.
    code, stdout, stderr = _run_cli(capsys, *cv_args, "--out", str(out), "--resume", "--set",
                                    "tracking.mode=disabled")
    assert code == 0, stderr
    assert not (out / "wandb").exists()


def test_resume_of_a_complete_run_changes_nothing(straight_cv: Path, cv_args: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(straight_cv, out, symlinks=True)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, stderr = _run_cli(capsys, *cv_args, "--out", str(out), "--resume")
    assert code == 0, stderr
    assert "already a complete run: nothing to resume" in stdout and "balanced_accuracy" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    code, _, stderr = _run_cli(capsys, *cv_args, "--out", str(out), "--resume", "--set", "cv.repeats=1")
    assert code == 2 and "already complete with another config: cv.repeats was 2 and is now 1" in stderr


def test_existing_output_folders_are_refused_before_any_work(straight_cv: Path, cv_args: list[str],
                                                             tiny_cohort: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    nowhere = str(tmp_path / "no_bags")  # the refusal must come before the bags are even looked at
    commands = {
        "train": ["train", "--cohort", str(tiny_cohort), "--bags", nowhere, "--out", str(taken)],
        "cv": ["cv", "--cohort", str(tiny_cohort), "--bags", nowhere, "--out", str(taken)],
        "predict": ["predict", "--run", str(straight_cv), "--cohort", str(tiny_cohort), "--bags", nowhere,
                    "--out", str(taken)],
        "explain": ["explain", "--run", str(straight_cv), "--cohort", str(tiny_cohort), "--bags", nowhere,
                    "--out", str(taken)],
    }
    for name, args in commands.items():
        code, _, stderr = _run_cli(capsys, *args)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, (name, stderr)
        assert f"{taken} already exists and is not empty" in lines[0] and "--overwrite" in lines[0], name
        assert ("--resume" in lines[0]) == (name == "cv"), name
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    (tmp_path / "a_file").write_text("x")
    code, _, stderr = _run_cli(capsys, *commands["train"][:-1], str(tmp_path / "a_file"))
    assert code == 2 and "is a file, not a folder" in stderr


def test_a_run_being_written_is_never_cleared_by_a_second_process(cv_args: list[str], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    with atomic_folder(out, what="run folder") as busy:  # holds the lock a running milhema holds
        (busy / "config.yaml").write_text("in progress")
        code, _, stderr = _run_cli(capsys, *cv_args, "--out", str(out), "--overwrite")
        assert code == 2 and "is being written by another milhema process right now" in stderr
        assert (busy / "config.yaml").read_text() == "in progress"
        (busy / "metrics.json").write_text("{}")
    assert (out / "config.yaml").read_text() == "in progress"


def test_torchrun_resumes_a_killed_cv_with_rank_0_choosing_the_folds(interrupted_cv: Path, cv_args: list[str],
                                                                     tmp_path: Path) -> None:
    """Two gloo processes resume an interrupted run: rank 0 reuses the finished fold and the other
    rank loads its checkpoint instead of training it, so the ranks stay in lockstep."""
    out = _copy_interrupted(interrupted_cv, tmp_path)
    kept = partial_folder(out) / "checkpoints" / "r0_f0.safetensors"
    stamp = kept.stat().st_mtime_ns
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "milhema",
         *cv_args, "--out", str(out), "--resume"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("1 finished fold(s) found") == 1  # rank 0 reports
    assert (out / "checkpoints" / "r0_f0.safetensors").stat().st_mtime_ns == stamp
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and not partial_folder(out).exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.safetensors")) == [
        "r0_f0.safetensors", "r0_f1.safetensors", "r1_f0.safetensors", "r1_f1.safetensors"]
