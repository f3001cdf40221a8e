"""The cell-classifier measurements of docs/RESULTS.md ("Cell types, anomalies and the differential").

    OMP_NUM_THREADS=1 python tools/cells_benchmark.py --out /tmp/cells_bench [--patients 120] [--seed 17]
        [--cells 120] [--cnn-input 96] [--skip-cnn] [--skip-patients]

Through the command line, as a user would: ``milhema synth`` (crop folders, default difficulty),
``milhema embed --backbone none --morphology`` (16 handcrafted features), and unless ``--skip-cnn``
``milhema embed --backbone timm/resnet18 --no-pretrained`` (random weights, ``--cnn-input`` px);
``milhema cells train`` (5 patient-grouped folds) with the linear and the MLP head on each;
``milhema cells predict`` of the MLP on the morphology bags. Then, from the bags themselves (not from
the run's metrics): the differential of every patient (all slides pooled; the run's patients each
predicted by the fold model that held them out) against the simulator's truth (cells.csv),
per type: mean absolute error in percentage points and how often the 95 % interval holds the true
percentage. Unless ``--skip-patients``: ``milhema cv`` with the CBC as patient features, then with
the CBC and the predicted differential, to see what the differential adds (the "features only"
logistic baseline of each run, and the MIL model with concat fusion).

Prints markdown tables and writes ``summary.json`` into ``--out``. Seeds: the cohort's
``--seed``; training seeds are the config defaults (``cells.seed: 0``, ``train.seed: 0``).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from milhema.config import DEFAULTS
from milhema.data import load_cohort
from milhema.differential import cell_differential, read_slide_predictions

CBC = DEFAULTS["data"]["patient_features"]
DIFF = ["diff_blast", "diff_blast_auer", "diff_promyelocyte", "diff_hypogranular_neutrophil", "diff_pseudo_pelger",
        "diff_vacuolated_neutrophil", "diff_vacuolated_monocyte", "diff_reactive_lymphocyte",
        "anomaly_vacuoles", "anomaly_hypogranular", "anomaly_pseudo_pelger"]


def milhema(*args: str) -> None:
    started = time.perf_counter()
    print("$ milhema " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "milhema", *args, "-q"], check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def truth_percentages(cohort_dir: Path, patient: str, slides: list[str], types: list[str]) -> np.ndarray:
    counts = np.zeros(len(types))
    for slide in slides:
        with open(cohort_dir / "slides" / slide / "cells.csv", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                counts[types.index(row["cell_type"])] += 1
    return 100 * counts / max(counts.sum(), 1)


def differential_vs_truth(cohort_dir: Path, bags: Path) -> dict[str, Any]:
    """Per type: MAE (pp) of the bags' predicted differential against the simulator's, and interval coverage."""
    cohort = load_cohort(cohort_dir, DEFAULTS["data"]["classes"], ())
    found = read_slide_predictions(cohort, bags, cohort.patient_ids, required=True)
    types = list(next(iter(found.values()))[0].predictions.type_names)
    errors, held, truth = [], [], []
    for pid, slides in found.items():
        probs = np.concatenate([s.predictions.type_probs for s in slides])
        true = truth_percentages(cohort_dir, pid, [s.slide_id for s in slides], types)
        est = cell_differential(probs)
        errors.append([abs(e.percent - t) for e, t in zip(est, true, strict=True)])
        held.append([e.low - 1e-9 <= t <= e.high + 1e-9 for e, t in zip(est, true, strict=True)])
        truth.append(true)
    errors_a, held_a, truth_a = np.array(errors), np.array(held), np.array(truth)
    return {"patients": len(found), "types": {t: {"mae_pp": float(errors_a[:, i].mean()),
                                                   "coverage_95": float(held_a[:, i].mean()),
                                                   "mean_true_pct": float(truth_a[:, i].mean())}
                                               for i, t in enumerate(types)},
            "mae_pp_mean": float(errors_a.mean()), "coverage_95_mean": float(held_a.mean())}


def summary_of(run: Path) -> dict[str, Any]:
    m = json.loads((run / "metrics.json").read_text())
    t = m["type_metrics"]
    return {"balanced_accuracy": t["balanced_accuracy"], "chance": t["chance_balanced_accuracy"],
            "macro_f1": t["macro_f1"], "ece": m["calibration"]["ece"], "per_type": t["per_type"],
            "attributes": {k: {"auroc": v["auroc"], "average_precision": v["average_precision"],
                               "positives": v["positives"], "prevalence": v["prevalence"]}
                           for k, v in m.get("attribute_metrics", {}).items()},
            "differential_oof": {"mae_pp_mean": m["differential"]["mae_pp_mean_over_types"],
                                 "coverage_95_mean": m["differential"]["coverage_95_mean_over_types"]},
            "n_cells": m["n_cells"], "n_patients": m["n_patients"], "wall_time_s": m["wall_time_s"]}


def ci(metric: dict[str, Any]) -> str:
    lo, hi = metric["ci95"]
    return f"{metric['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def patient_level(cohort: Path, bags: Path, out: Path) -> dict[str, Any]:
    results = {}
    for name, features in (("cbc", CBC), ("cbc+differential", CBC + DIFF)):
        run = out / f"cv_{name.replace('+', '_')}"
        if not (run / "metrics.json").is_file():
            milhema("cv", "--cohort", str(cohort), "--bags", str(bags), "--out", str(run), "--overwrite",
                    "--set", f"data.patient_features=[{', '.join(features)}]", "train.epochs=60",
                    "tracking.mode=disabled")
        m = json.loads((run / "metrics.json").read_text())
        results[name] = {"mil_concat": {k: m["patient"][k] for k in ("balanced_accuracy", "macro_auroc")},
                         "features_only": {k: m["baselines"]["cbc_only"]["patient"][k]
                                           for k in ("balanced_accuracy", "macro_auroc")}}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--cells", type=int, default=120)
    parser.add_argument("--cnn-input", type=int, default=96)
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--skip-patients", action="store_true")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cohort, morph, cnn = out / "cohort", out / "bags_morphology", out / "bags_cnn"
    if not (cohort / "slides.csv").is_file():
        milhema("synth", "--out", str(cohort), "--patients", str(args.patients), "--seed", str(args.seed),
                "--cells", str(args.cells))
    milhema("embed", "--cohort", str(cohort), "--out", str(morph), "--backbone", "none", "--morphology")
    features = {"morphology (16 handcrafted)": morph}
    if not args.skip_cnn:
        milhema("embed", "--cohort", str(cohort), "--out", str(cnn), "--backbone", "timm/resnet18", "--no-pretrained",
                "--input-size", str(args.cnn_input))
        features[f"random-weight resnet18 ({args.cnn_input} px)"] = cnn
    summary: dict[str, Any] = {"patients": args.patients, "seed": args.seed, "cells_per_slide": args.cells, "runs": {}}
    for name, bags in features.items():
        for head in ("linear", "mlp"):
            run = out / f"cells_{bags.name}_{head}"
            if not (run / "metrics.json").is_file():
                milhema("cells", "train", "--cohort", str(cohort), "--bags", str(bags), "--out", str(run),
                        "--overwrite", "--set", f"cells.head={head}")
            summary["runs"][f"{name}, {head}"] = summary_of(run)
    best = out / "cells_bags_morphology_mlp"
    milhema("cells", "predict", "--run", str(best), "--bags", str(morph), "--overwrite")
    summary["differential_from_bags"] = differential_vs_truth(cohort, morph)
    if not args.skip_patients:
        summary["patient_level"] = patient_level(cohort, morph, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report(summary)


def report(summary: dict[str, Any]) -> None:
    print("| features, head | cells | balanced accuracy [95% CI] | chance | macro F1 | ECE before → after |")
    print("|---|---|---|---|---|---|")
    for name, r in summary["runs"].items():
        print(f"| {name} | {r['n_cells']} | {ci(r['balanced_accuracy'])} | {r['chance']:.3f} | {r['macro_f1']:.3f} | "
              f"{r['ece']['before']:.3f} → {r['ece']['after']:.3f} |")
    print()
    runs = summary["runs"]
    names = list(runs)
    types = list(next(iter(runs.values()))["per_type"])
    diff = summary["differential_from_bags"]["types"]
    print("| type | cells | " + " | ".join(f"recall / precision: {n}" for n in names)
          + " | differential MAE (pp) | true % (mean) | interval coverage |")
    print("|---|---|" + "---|" * len(names) + "---|---|---|")
    for t in types:
        cells = runs[names[0]]["per_type"][t]["support"]
        scores = " | ".join(f"{runs[n]['per_type'][t]['recall']:.2f} / {runs[n]['per_type'][t]['precision']:.2f}"
                            for n in names)
        print(f"| {t} | {cells} | {scores} | {diff[t]['mae_pp']:.2f} | {diff[t]['mean_true_pct']:.1f} | "
              f"{diff[t]['coverage_95']:.2f} |")
    d = summary["differential_from_bags"]
    print(f"\ndifferential over {d['patients']} patients: MAE {d['mae_pp_mean']:.2f} pp (mean over types), interval "
          f"coverage {d['coverage_95_mean']:.2f}\n")
    print("| attribute | positives | prevalence | " + " | ".join(f"AUROC / AP: {n}" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for a in next(iter(runs.values()))["attributes"]:
        first = runs[names[0]]["attributes"][a]
        scores = " | ".join(f"{ci(runs[n]['attributes'][a]['auroc'])} / {runs[n]['attributes'][a]['average_precision']['mean']:.3f}"
                            for n in names)
        print(f"| {a} | {first['positives']} | {first['prevalence']:.4f} | {scores} |")
    if "patient_level" in summary:
        print("\n| patient features | MIL (abmil, concat) balanced accuracy | features-only logistic balanced accuracy | "
              "features-only macro AUROC |")
        print("|---|---|---|---|")
        for name, r in summary["patient_level"].items():
            print(f"| {name} | {ci(r['mil_concat']['balanced_accuracy'])} | "
                  f"{ci(r['features_only']['balanced_accuracy'])} | {ci(r['features_only']['macro_auroc'])} |")


if __name__ == "__main__":
    main()
