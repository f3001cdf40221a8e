"""Domain shift between acquisition profiles, with and without stain normalisation.

Train on simulated cohorts of one acquisition profile, test (``milhema predict`` on a labelled
cohort: an external validation) on cohorts of other profiles, for each ``--stain-normalize``
method. The reference of a normalised arm is fitted on the training cohort and passed to the test
cohorts' embedding (``--stain-reference``), as a deployed model would be used. The test cohorts
of one seed hold the same patients and cells rendered under each profile (a paired comparison),
and a fresh cohort of the training profile (new patients) gives the in-domain reference.

    python tools/domain_shift.py --work /tmp/shift [--train-profile scanner-40x]
        [--test-profiles scanner-40x,wright-pale,camera-yellow,camera-dim] [--methods none,macenko,reinhard]
        [--seeds 0] [--train-patients 60] [--test-patients 40] [--cells 40] [--markdown table.md]

Every step is a ``milhema`` command (printed, and kept in WORK/commands.txt); finished steps are
skipped, so an interrupted run continues. Features: ``--backbone none --morphology`` (16
handcrafted features measured in optical density: stain-sensitive by construction) by default;
``--backbone timm/resnet18`` adds a random-weight ResNet-18 at 64 px. Models: ABMIL on the cells
alone (``data.patient_features=[]``: the CBC does not depend on the microscope and would hide the shift).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _milhema(args: list[str], log: Path) -> None:
    command = [sys.executable, "-m", "milhema", *args]
    with log.open("a", encoding="utf-8") as fh:
        fh.write("milhema " + " ".join(args) + "\n")
    print("$ milhema " + " ".join(args), file=sys.stderr, flush=True)
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def _balanced_accuracy(metrics: dict[str, Any]) -> float:
    """The patient-level balanced accuracy of a metrics.json (predict or train)."""
    for key in ("patient", "early_stopping_split"):
        if key in metrics and "balanced_accuracy" in metrics[key]:
            value = metrics[key]["balanced_accuracy"]
            return float(value["mean"] if isinstance(value, dict) else value)
    raise KeyError("no patient balanced_accuracy in metrics.json")


def run(work: Path, train_profile: str, test_profiles: list[str], methods: list[str], seed: int,
        train_patients: int, test_patients: int, cells: int, backbone: str, workers: int) -> dict[str, float]:
    """Balanced accuracy per (test profile, method) for one seed; trains one model per method."""
    log = work / "commands.txt"
    quiet = ["-q"]
    features = ["--backbone", "none", "--morphology"] if backbone == "none" else [
        "--backbone", backbone, "--no-pretrained", "--input-size", "64", "--morphology"]
    train_cohort = work / f"train_{train_profile}_s{seed}"
    if not train_cohort.exists():
        _milhema(["synth", "--out", str(train_cohort), "--patients", str(train_patients), "--seed", str(seed),
                  "--cells", str(cells), "--acquisition", train_profile, "--workers", str(workers), *quiet], log)
    tests = {}
    for profile in test_profiles:
        tests[profile] = work / f"test_{profile}_s{seed}"
        if not tests[profile].exists():
            # Seed 1000 + seed: new patients, the same for every test profile.
            _milhema(["synth", "--out", str(tests[profile]), "--patients", str(test_patients), "--seed",
                      str(1000 + seed), "--cells", str(cells), "--acquisition", profile, "--workers", str(workers),
                      *quiet], log)
    results = {}
    tag = "morph" if backbone == "none" else backbone.replace("/", "-")
    for method in methods:
        bags = work / f"bags_{train_cohort.name}_{method}_{tag}"
        if not (bags / "done").exists():
            _milhema(["embed", "--cohort", str(train_cohort), "--out", str(bags), *features,
                      "--stain-normalize", method, *quiet], log)
            (bags / "done").write_text("")
        run_dir = work / f"run_{train_cohort.name}_{method}_{tag}"
        if not (run_dir / "metrics.json").exists():
            _milhema(["train", "--cohort", str(train_cohort), "--bags", str(bags), "--out", str(run_dir),
                      "--overwrite", "--set", "data.patient_features=[]", f"train.seed={seed}", *quiet], log)
        for profile, cohort in tests.items():
            test_bags = work / f"bags_{cohort.name}_{method}_{tag}"
            if not (test_bags / "done").exists():
                reference = ["--stain-reference", str(bags / "stain_reference.json")] if method != "none" else []
                _milhema(["embed", "--cohort", str(cohort), "--out", str(test_bags), *features,
                          "--stain-normalize", method, *reference, *quiet], log)
                (test_bags / "done").write_text("")
            predicted = work / f"predict_{run_dir.name}_on_{cohort.name}"
            if not (predicted / "metrics.json").exists():
                _milhema(["predict", "--run", str(run_dir), "--cohort", str(cohort), "--bags", str(test_bags),
                          "--out", str(predicted), "--overwrite", *quiet], log)
            results[f"{profile}|{method}"] = _balanced_accuracy(json.loads((predicted / "metrics.json").read_text()))
    return results


def table(results: dict[int, dict[str, float]], train_profile: str, test_profiles: list[str],
          methods: list[str]) -> list[str]:
    """Markdown: balanced accuracy per test profile and method (mean over seeds, each seed in brackets),
    the drop from the in-domain test cohort, and how much of it normalisation recovers."""
    seeds = sorted(results)

    def mean(profile: str, method: str) -> float:
        return sum(results[s][f"{profile}|{method}"] for s in seeds) / len(seeds)

    def shown(profile: str, method: str) -> str:
        each = ", ".join(f"{results[s][f'{profile}|{method}']:.2f}" for s in seeds)
        return f"{mean(profile, method):.2f}" + (f" ({each})" if len(seeds) > 1 else "")

    home = train_profile if train_profile in test_profiles else None
    lines = ["| test profile | " + " | ".join(f"{m}" for m in methods)
             + (" | drop without normalisation | recovered by " + " / ".join(m for m in methods if m != "none")
                if home and "none" in methods else "") + " |",
             "|---|" + "---|" * len(methods) + ("---|---|" if home and "none" in methods else "")]
    for profile in test_profiles:
        row = f"| `{profile}`{' (in domain)' if profile == home else ''} | " + " | ".join(
            shown(profile, m) for m in methods)
        if home and "none" in methods:
            drop = mean(home, "none") - mean(profile, "none")
            recovered = []
            for m in methods:
                if m == "none":
                    continue
                gained = mean(profile, m) - mean(profile, "none")
                recovered.append(f"{gained:+.2f}" + (f" ({gained / drop:.0%})" if drop > 0.02 else ""))
            row += f" | {drop:+.2f} | " + " / ".join(recovered)
        lines.append(row + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for cohorts, bags and runs (kept)")
    parser.add_argument("--train-profile", default="scanner-40x")
    parser.add_argument("--test-profiles", default="scanner-40x,wright-pale,camera-yellow,camera-dim")
    parser.add_argument("--methods", default="none,macenko,reinhard")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (cohorts, folds and weights)")
    parser.add_argument("--train-patients", type=int, default=60)
    parser.add_argument("--test-patients", type=int, default=40)
    parser.add_argument("--cells", type=int, default=40, help="mean white cells per slide")
    parser.add_argument("--backbone", default="none", help="none (morphology only) or timm/resnet18")
    parser.add_argument("--workers", type=int, default=2, help="synth processes")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    profiles = args.test_profiles.split(",")
    methods = args.methods.split(",")
    start = time.perf_counter()
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        results[seed] = run(args.work, args.train_profile, profiles, methods, seed, args.train_patients,
                            args.test_patients, args.cells, args.backbone, args.workers)
        (args.work / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"Trained on `{args.train_profile}` ({args.train_patients} patients per seed), tested on "
             f"{args.test_patients} new patients per profile, ~{args.cells} cells per slide, crops; features: "
             + ("morphology (16)" if args.backbone == "none" else f"{args.backbone} (random weights, 64 px) + morphology")
             + f"; ABMIL, cells only; seeds {args.seeds}; balanced accuracy over 4 classes (chance 0.25); "
             f"{time.perf_counter() - start:.0f} s.", "", *table(results, args.train_profile, profiles, methods)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
