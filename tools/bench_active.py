"""Active learning for the cell classifier: labels needed per strategy (docs/RESULTS.md).

    OMP_NUM_THREADS=1 python tools/bench_active.py --work /tmp/bench_active [--patients 80] [--seed 11]
        [--cells 60] [--seeds 3] [--budgets 50,100,200,400,800,1600,3200] [--epochs 40]

A simulated cohort (``milhema synth``, default difficulty, every cell with its true type) embedded
with the 16 morphology features (``milhema embed --backbone none --morphology``), both through the
command line and kept in ``--work`` for a rerun. Then, through the library functions that
``milhema cells propose`` and ``cells train`` use:

* per seed, a third of the patients is held out (whole patients); the others' cells are the pool;
* **fully supervised**: one classifier trained on every pool cell;
* per strategy (uncertainty, margin, coreset, random) and seed: the same random start of the first
  budget's cells, then rounds: train a classifier on the labelled cells (``fit_classifier``: the
  ``cells.head`` MLP, early-stopped and calibrated on a patient-grouped fifth of them, as each
  fold of ``cells train``), score the held-out patients, then :func:`milhema.cells.active.select` the
  next cells from the rest of the pool (labels from the simulator's truth) up to the next budget.

Score: balanced accuracy (mean recall over the types present) of the held-out patients' cells,
with the ``cells train`` decision (``argmax p / training frequency``). The labels each strategy
needs to reach 95 % of the fully supervised accuracy are read from the mean curve over seeds,
interpolated linearly in log(labels) between budgets, and per seed. Prints markdown tables; writes
``summary.json`` into ``--work``; ``--report`` prints them again from it without training.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from milhema.cells.active import STRATEGIES, select
from milhema.cells.annotations import AnnotatedCells, gather
from milhema.cells.fit import fit_classifier, validation_split
from milhema.cells.model import CellClassifier, decide
from milhema.config import DEFAULTS, load_config
from milhema.data import load_cohort
from milhema.train.metrics import balanced_accuracy


def milhema(*args: str) -> None:
    started = time.perf_counter()
    print("$ milhema " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "milhema", *args, "-q"], check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def prepare(work: Path, patients: int, seed: int, cells: int) -> tuple[Path, Path]:
    cohort, bags = work / "cohort", work / "bags"
    if not (cohort / "slides.csv").is_file():
        milhema("synth", "--out", str(cohort), "--patients", str(patients), "--seed", str(seed),
                "--cells", str(cells), "--crop-px", "64")
    if not bags.is_dir() or len(list(bags.glob("*.h5"))) < len(load_cohort(cohort, DEFAULTS["data"]["classes"],
                                                                           ()).slides):
        milhema("embed", "--cohort", str(cohort), "--out", str(bags), "--backbone", "none", "--morphology")
    return cohort, bags


def train(cells: AnnotatedCells, rows: np.ndarray, settings: Any, seed: int) -> CellClassifier:
    """One classifier on ``rows``, early-stopped and calibrated on a patient-grouped fifth of them."""
    inner, val = validation_split(cells, rows, settings.val_fraction, seed)
    model, _ = fit_classifier(cells, inner, val, settings, torch.device("cpu"), seed)
    return model


def score(model: CellClassifier, cells: AnnotatedCells, rows: np.ndarray) -> float:
    probs, _ = model.probabilities(cells.features[rows])
    return balanced_accuracy(cells.y[rows], decide(probs, model.type_prior.numpy()), len(cells.types))


def learning_curve(cells: AnnotatedCells, pool: np.ndarray, test: np.ndarray, strategy: str, start: np.ndarray,
                   budgets: list[int], settings: Any, seed: int) -> list[float]:
    """Held-out balanced accuracy at each budget: rounds of train -> score -> select."""
    labelled, curve = list(start), []
    for k, budget in enumerate(budgets):
        rows = np.array(labelled, np.int64)
        model = train(cells, rows, settings, seed)
        curve.append(score(model, cells, test))
        if k + 1 == len(budgets):
            break
        rest = np.setdiff1d(pool, rows)
        probs, _ = model.probabilities(cells.features[rest])
        standardise = ((cells.features - model.mean.numpy()) / model.std.numpy()).astype(np.float32)
        picked = select(strategy, budgets[k + 1] - budget, probs=probs, features=standardise[rest],
                        labelled=standardise[rows], seed=seed * 1000 + k)
        labelled += rest[picked].tolist()
    return curve


def labels_to_reach(budgets: list[int], curve: list[float], target: float) -> float:
    """Labels at which the mean ``curve`` first reaches ``target`` (log-linear between budgets); inf if never."""
    for k, value in enumerate(curve):
        if value >= target:
            if k == 0:
                return float(budgets[0])
            a, b = math.log(budgets[k - 1]), math.log(budgets[k])
            t = (target - curve[k - 1]) / (value - curve[k - 1])
            return math.exp(a + t * (b - a))
    return math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--seed", type=int, default=11, help="the cohort's seed")
    parser.add_argument("--cells", type=int, default=60, help="mean cells per slide")
    parser.add_argument("--seeds", type=int, default=3, help="repeats (split, start set, training seed)")
    parser.add_argument("--budgets", default="50,100,200,400,800,1600,3200")
    parser.add_argument("--epochs", type=int, default=40, help="cells.epochs of each round's classifier (patience 10)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--report", action="store_true", help="only print the tables of --work/summary.json")
    args = parser.parse_args()
    if args.report:
        saved = json.loads((args.work / "summary.json").read_text())
        results = {"curves": saved["curves"], "full": saved["full"], "pool": saved["pool_cells"],
                   "test_cells": saved["test_cells"]}
        args.seeds = len(saved["full"])
        report(results, saved["budgets"], list(saved["curves"]), args, saved["seconds"], write=False)
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    cohort_dir, bags = prepare(args.work, args.patients, args.seed, args.cells)
    budgets = [int(b) for b in args.budgets.split(",")]
    strategies = args.strategies.split(",")
    settings = load_config(None, [f"cells.epochs={args.epochs}", "cells.patience=10"]).cells
    cohort = load_cohort(cohort_dir, DEFAULTS["data"]["classes"], ())
    cells = gather(cohort, bags, settings)
    patients = np.array(cells.patient_ids, dtype=object)
    results: dict[str, Any] = {"curves": {s: [] for s in strategies}, "full": [], "pool": [], "test_cells": []}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        held = set(rng.permutation(patients)[: len(patients) // 3].tolist())
        is_test = np.array([p in held for p in cells.patients])
        pool, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        results["pool"].append(len(pool))
        results["test_cells"].append(len(test))
        results["full"].append(score(train(cells, pool, settings, seed), cells, test))
        start = rng.choice(pool, budgets[0], replace=False)
        print(f"seed {seed}: pool {len(pool)} cells, {len(test)} held-out cells; fully supervised "
              f"{results['full'][-1]:.3f} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        for strategy in strategies:
            curve = learning_curve(cells, pool, test, strategy, start, budgets, settings, seed)
            results["curves"][strategy].append(curve)
            print(f"  {strategy:<12} " + " ".join(f"{v:.3f}" for v in curve) +
                  f" ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    report(results, budgets, strategies, args, time.perf_counter() - started)


def report(results: dict[str, Any], budgets: list[int], strategies: list[str], args: argparse.Namespace,
           seconds: float, write: bool = True) -> None:
    full = float(np.mean(results["full"]))
    target = 0.95 * full
    print(f"\nfully supervised (every pool cell, {int(np.mean(results['pool']))} on average): balanced accuracy "
          f"{full:.3f} (seeds: {', '.join(f'{v:.3f}' for v in results['full'])}); 95 % of it: {target:.3f}\n")
    print("| strategy | " + " | ".join(str(b) for b in budgets) + " | labels to 95 % of full | ratio to random |")
    print("|---|" + "---|" * (len(budgets) + 2))
    needed = {}
    for strategy in strategies:
        curves = np.array(results["curves"][strategy])
        mean = curves.mean(axis=0)
        needed[strategy] = labels_to_reach(budgets, mean.tolist(), target)
    for strategy in strategies:
        curves = np.array(results["curves"][strategy])
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(curves.mean(axis=0), curves.std(axis=0), strict=True)]
        ratio = needed[strategy] / needed["random"] if "random" in needed else math.nan
        shown = f"{needed[strategy]:.0f}" if math.isfinite(needed[strategy]) else f"> {budgets[-1]}"
        print(f"| {strategy} | " + " | ".join(cells) + f" | {shown} | "
              f"{f'{ratio:.2f}' if math.isfinite(ratio) else '–'} |")
    print(f"\n({args.seeds} seeds, mean ± sd; {seconds / 60:.1f} min)\n")
    print("Per seed (each against 95 % of its own fully supervised accuracy): labels needed (ratio to random)")
    for strategy in strategies:
        shown = []
        for seed, full_seed in enumerate(results["full"]):
            n = labels_to_reach(budgets, results["curves"][strategy][seed], 0.95 * full_seed)
            base = labels_to_reach(budgets, results["curves"]["random"][seed], 0.95 * full_seed) \
                if "random" in strategies else math.nan
            ratio = n / base if math.isfinite(n) and math.isfinite(base) else math.nan
            shown.append(f"{n:.0f} ({ratio:.2f})" if math.isfinite(n) else f"> {budgets[-1]}")
        print(f"  {strategy:<12} " + ", ".join(shown))
    summary = {"budgets": budgets, "full": results["full"], "target": target, "curves": results["curves"],
               "labels_to_target": needed, "pool_cells": results["pool"], "test_cells": results["test_cells"],
               "args": {k: str(v) for k, v in vars(args).items()}, "seconds": round(seconds, 1)}
    if write:
        (args.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
