"""Slide latency: one large simulated smear from file to patient prediction (detect → embed → predict).

Setup (not timed, cached in --scratch): a small simulated scan cohort is embedded with the same
backbone and a model is trained on it; the large slide (--size px square, default 40,000) is
rendered once, or taken from --slide. Timed: ``milhema embed`` on a one-patient cohort holding
the large slide (white-cell detection, then crops → backbone → bag), then ``milhema predict``
with the trained run, each as the command a user would run. Prints a table and, with --record,
appends it to docs/PERFORMANCE.md.

    python tools/bench_slide.py --scratch /tmp/bench_slide [--size 40000] [--slide PATH]
                                [--backbone timm/resnet18] [--device auto] [--record]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_detect import render_large  # tools/ is on sys.path when a tool runs as a script
from perf_record import report

from milhema.io import write_csv


def milhema(*args: str) -> float:
    """Run ``milhema ARGS`` (quiet, tracking off); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "milhema", *args, "--quiet"], check=True,
                   env={**os.environ, "WANDB_MODE": "disabled"})
    return time.perf_counter() - start


def reference_run(scratch: Path, backbone: str, device: str) -> Path:
    """A model trained on a small simulated scan cohort embedded with ``backbone`` (made once)."""
    cohort, bags, run = scratch / "train_cohort", scratch / "train_bags", scratch / "run"
    if not cohort.exists():
        milhema("synth", "--out", str(cohort), "--patients", "12", "--wsi", "--wsi-size", "2500", "--seed", "5",
                "--acquisition", "default")
    if not run.exists():
        milhema("embed", "--cohort", str(cohort), "--out", str(bags), "--backbone", backbone, "--no-pretrained",
                "--device", device)
        milhema("train", "--cohort", str(cohort), "--bags", str(bags), "--out", str(run),
                "--set", "train.epochs=5", "tracking.mode=disabled", f"train.device={device}")
    return cohort


def one_patient_cohort(folder: Path, train_cohort: Path, slide: Path) -> None:
    """patients.csv with one patient (CBC copied from a training patient) whose only slide is ``slide``."""
    folder.mkdir(parents=True, exist_ok=True)
    with (train_cohort / "patients.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        row = next(reader)
        header = reader.fieldnames or []
    row["patient_id"] = "LARGE"
    write_csv(folder / "patients.csv", header, [[row[h] for h in header]])
    write_csv(folder / "slides.csv", ["slide_id", "patient_id", "source", "view"],
              [["large", "LARGE", str(slide.resolve()), "PB"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", type=Path, default=Path("bench_slide"))
    parser.add_argument("--size", type=int, default=40000, help="side of the rendered slide in px")
    parser.add_argument("--slide", type=Path, default=None, help="an existing scan to use instead of rendering one")
    parser.add_argument("--backbone", default="timm/resnet18")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    train_cohort = reference_run(args.scratch, args.backbone, args.device)
    slide = args.slide or render_large(args.scratch / f"large_{args.size}.tiff", args.size, os.cpu_count() or 1)
    cohort, bags, pred = args.scratch / "one", args.scratch / "one_bags", args.scratch / "one_pred"
    one_patient_cohort(cohort, train_cohort, slide)
    shutil.rmtree(bags, ignore_errors=True)
    shutil.rmtree(pred, ignore_errors=True)
    embed_s = milhema("embed", "--cohort", str(cohort), "--out", str(bags), "--backbone", args.backbone,
                      "--no-pretrained", "--device", args.device)
    predict_s = milhema("predict", "--run", str(args.scratch / "run"), "--cohort", str(cohort), "--bags", str(bags),
                        "--out", str(pred), "--device", args.device)
    qc = json.loads((bags / "detections" / "large.json").read_text())["qc"]
    detect_s = float(qc["seconds"])
    with (bags / "detections" / "large.csv").open() as fh:
        n_cells = sum(1 for _ in fh) - 1
    with (pred / "predictions.csv").open() as fh:
        prediction = next(csv.DictReader(fh))
    import torch  # after the timed commands: the benchmark's own imports stay out of their time

    device = (torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available()
              else f"CPU, {os.cpu_count()} cores")
    total = embed_s + predict_s
    lines = [f"## Slide latency ({device}, torch {torch.__version__}, {datetime.date.today().isoformat()})", "",
             f"`python tools/bench_slide.py --size {args.size} --backbone {args.backbone} --device {args.device}`: "
             f"one {args.size:,} × {args.size:,} px simulated smear (0.25 µm/px), "
             f"{n_cells:,} white cells detected; wall time of the commands a user runs "
             "(each starts a fresh Python process, imports included).", "",
             "| detection | crops → backbone → bag | `milhema embed` total | `milhema predict` | file → prediction |",
             "|---|---|---|---|---|",
             f"| {detect_s:.0f} s | {embed_s - detect_s:.0f} s | {embed_s:.0f} s | {predict_s:.0f} s | **{total:.0f} s** |",
             "", f"Predicted: {prediction['pred']}"
             f" (the model is a 5-epoch fit on 12 small scans with random backbone weights: latency, not accuracy). "
             f"Machine: {platform.machine()}."]
    report(lines, args.record)


if __name__ == "__main__":
    main()
