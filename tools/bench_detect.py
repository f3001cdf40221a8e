"""White-cell detection on simulated scans: accuracy against the truth, and throughput and memory
on one large slide. Prints tables and, with --record, appends them to docs/PERFORMANCE.md.

    python tools/bench_detect.py --scratch /tmp/bench_detect [--patients 8] [--size 40000] [--record]
    python tools/bench_detect.py --profiles all [--mpps 0.08,0.25,0.5] [--kinds scan,fields]
                                 [--patients 2] [--cells 30] [--record]

--profiles: recall and precision per acquisition profile (milhema synth --acquisition), at each
pixel size, on scans and on folders of photographed fields. Every profile renders the same
patients and cells (one seed), so the rows differ by acquisition only. A detection that matches
no true cell and lies outside every white cell's box is a platelet, red cell or stain precipitate
counted as a white cell ("debris" column: the target is none); an unmatched detection inside a
white cell's box is a split or a duplicate. Targets: recall ≥ 0.95 and precision ≥ 0.95 everywhere.

Accuracy: a simulated cohort of scans at default difficulty (0.25 µm/px, ~300 white cells per
slide, touching pairs, smudge cells, platelets and precipitate); a detection matches a true cell
within 5 µm of its centre (one-to-one, closest first). Scale: one square slide of --size px with
cells at the default density is rendered once (cached in --scratch), then detected in a child
process whose peak resident memory (and that of its tile workers) is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from perf_record import record  # tools/ is on sys.path when a tool runs as a script

from milhema.slides.detect import DetectOptions, detect_cells, match_points
from milhema.slides.source import field_options
from milhema.slides.wsi import WholeSlide, read_scan_truth, truth_path

TARGET = 0.95


def accuracy(scratch: Path, patients: int, seed: int, workers: int) -> tuple[list[str], dict[str, float]]:
    from milhema.synth.cohort import synthesize_cohort

    cohort = scratch / f"cohort_{patients}_{seed}"
    if not cohort.exists():
        synthesize_cohort(cohort, patients, seed=seed, wsi=True, workers=workers)
    per_type_true: Counter[str] = Counter()
    per_type_hit: Counter[str] = Counter()
    n_true = n_found = n_match = 0
    seconds = 0.0
    megapixels = 0.0
    for scan in sorted((cohort / "slides").glob("*.tiff")):
        slide = WholeSlide(scan.stem, scan)
        found = detect_cells(slide, DetectOptions(workers=workers, progress=False))
        xy, types, _ = read_scan_truth(truth_path(scan), scan.stem)
        pairs = match_points(xy, found.centres.astype(float), 5.0 / slide.mpp)
        per_type_true.update(types)
        per_type_hit.update(types[i] for i, _ in pairs)
        n_true, n_found, n_match = n_true + len(xy), n_found + len(found), n_match + len(pairs)
        seconds += found.qc["seconds"]
        megapixels += slide.dimensions[0] * slide.dimensions[1] / 1e6
    recall, precision = n_match / n_true, n_match / max(n_found, 1)
    lines = [
        f"Simulated cohort: {patients} patients, seed {seed}, default difficulty, "
        f"{len(list((cohort / 'slides').glob('*.tiff')))} scans, {n_true} white cells.",
        "",
        "| recall | precision | true cells | detections | matched | detection time |",
        "|---|---|---|---|---|---|",
        f"| {recall:.3f} | {precision:.3f} | {n_true} | {n_found} | {n_match} | {seconds:.1f} s "
        f"({megapixels / seconds:.1f} Mpx/s, {n_found / seconds:.0f} cells/s) |",
        "",
        "| cell type | true | recall |",
        "|---|---|---|",
        *[f"| {t} | {per_type_true[t]} | {per_type_hit[t] / per_type_true[t]:.3f} |"
          for t in sorted(per_type_true, key=lambda k: -per_type_true[k])],
    ]
    return lines, {"recall": recall, "precision": precision}


def _child(path: str, workers: int) -> None:
    """Runs in a fresh process: detect one slide and print JSON with the peak memory."""
    slide = WholeSlide("large", Path(path))
    found = detect_cells(slide, DetectOptions(workers=workers, progress=True))
    truth = truth_path(Path(path))
    recall = precision = float("nan")
    if truth.is_file():
        xy, _, _ = read_scan_truth(truth, "large")
        n = len(match_points(xy, found.centres.astype(float), 5.0 / slide.mpp))
        recall, precision = n / len(xy), n / max(len(found), 1)
    print(json.dumps({
        "cells": len(found), "seconds": found.qc["seconds"], "tiles": found.qc["tiles"],
        "megapixels": slide.dimensions[0] * slide.dimensions[1] / 1e6,
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "recall": recall, "precision": precision,
    }))


def render_large(path: Path, size: int, workers: int) -> Path:
    """A ``size`` × ``size`` px MDS smear at 0.25 µm/px and the default cell density, with its truth CSV
    (kept: rendering 40,000 px takes minutes)."""
    from milhema.io import write_csv
    from milhema.synth.composition import sample_disease, slide_cells
    from milhema.synth.smear import TRUTH_HEADER, plan_smear, write_smear
    from milhema.synth.stain import Stain

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    n_cells = int(round(size * size * 0.25 ** 2 / 8000.0))
    cells = slide_cells(sample_disease("MDS", "default", rng), np.array([0.55, 0.3, 0.1, 0.03, 0.02]),
                        n_cells, "PB", rng)
    spec = plan_smear(cells, size, size, 0.25, (2026, 1), Stain.random(rng))
    rows = write_smear(path, spec, workers=workers, progress=True)
    write_csv(truth_path(path), TRUTH_HEADER, rows)
    return path


def scale(scratch: Path, size: int, workers: int) -> list[str]:
    path = scratch / f"large_{size}.tiff"
    render_s = float("nan")
    if not path.exists():
        start = time.perf_counter()
        render_large(path, size, workers)
        render_s = time.perf_counter() - start
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--workers", str(workers)],
                         check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    file_mb = path.stat().st_size / 1e6
    return [
        f"One {size:,} × {size:,} px scan (0.25 µm/px, {r['megapixels']:,.0f} Mpx, {file_mb:,.0f} MB JPEG TIFF), "
        f"{workers} tile workers" + ("" if np.isnan(render_s) else f"; rendering it took {render_s:.0f} s") + ".",
        "",
        "| cells | recall | precision | time | Mpx/s | cells/s | peak RSS main | peak RSS per worker |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['cells']:,} | {r['recall']:.3f} | {r['precision']:.3f} | {r['seconds']:.0f} s "
        f"| {r['megapixels'] / r['seconds']:.1f} | {r['cells'] / r['seconds']:.0f} "
        f"| {r['rss_main_mb']:.0f} MB | {r['rss_worker_mb']:.0f} MB |",
    ]


def _images(cohort: Path, kind: str, mpp: float) -> list[WholeSlide]:
    """Every scan, or every field of every fields folder, of a simulated cohort."""
    from milhema.slides.fields import FieldImage

    slides = cohort / "slides"
    if kind == "scan":
        return [WholeSlide(p.stem, p) for p in sorted(slides.glob("*.tiff"))]
    return [FieldImage(folder.name, p, mpp_override=mpp) for folder in sorted(slides.iterdir()) if folder.is_dir()
            for p in sorted(folder.iterdir()) if p.suffix in (".jpg", ".png")]


def _truth_boxes(path: Path) -> np.ndarray:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([[float(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in rows]).reshape(-1, 4)


def profile_cell(scratch: Path, profile: str, mpp: float, kind: str, patients: int, cells: int, seed: int,
                 workers: int) -> dict[str, float]:
    """Counts of one (profile, mpp, kind): true cells, detections, matches, debris, seconds."""
    from milhema.synth.cohort import synthesize_cohort

    cohort = scratch / f"{profile}_{mpp:g}_{kind}_{patients}x{cells}_{seed}"
    if not cohort.exists():
        synthesize_cohort(cohort, patients, seed=seed, cells_per_slide=cells, acquisition=profile, mpp=mpp,
                          wsi=kind == "scan", fields=kind == "fields", workers=workers, progress=False)
    counts = dict.fromkeys(("true", "found", "matched", "debris", "seconds"), 0.0)
    for image in _images(cohort, kind, mpp):
        options = DetectOptions(workers=workers, progress=False)
        # Fields as milhema embed reads them.
        found = detect_cells(image, options if kind == "scan" else field_options(options))
        xy, _, _ = read_scan_truth(truth_path(image.path), image.slide_id)
        centres = found.centres.astype(float)
        pairs = match_points(xy, centres, 5.0 / image.mpp)
        unmatched = np.setdiff1d(np.arange(len(found)), [j for _, j in pairs])
        boxes = _truth_boxes(truth_path(image.path))
        pad = 1.0 / image.mpp   # 1 µm around the drawn outline
        inside = [bool(np.any((boxes[:, 0] - pad <= centres[j, 0]) & (centres[j, 0] <= boxes[:, 2] + pad)
                              & (boxes[:, 1] - pad <= centres[j, 1]) & (centres[j, 1] <= boxes[:, 3] + pad)))
                  for j in unmatched]
        counts["true"] += len(xy)
        counts["found"] += len(found)
        counts["matched"] += len(pairs)
        counts["debris"] += len(inside) - sum(inside)
        counts["seconds"] += float(found.qc.get("seconds", 0.0))
    return counts


def profiles_table(scratch: Path, profiles: list[str], mpps: list[float], kinds: list[str], patients: int,
                   cells: int, seed: int, workers: int) -> list[str]:
    """Markdown: one row per profile, recall / precision per (kind, mpp); then the counts behind them."""
    results = {}
    for profile in profiles:
        for kind in kinds:
            for mpp in mpps:
                start = time.perf_counter()
                results[profile, kind, mpp] = c = profile_cell(scratch, profile, mpp, kind, patients, cells, seed,
                                                               workers)
                print(f"{profile} {kind} {mpp:g}: {c['matched']:.0f}/{c['true']:.0f} matched, {c['found']:.0f} found, "
                      f"{c['debris']:.0f} debris ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    columns = [(kind, mpp) for kind in kinds for mpp in mpps]

    def cell(c: dict[str, float]) -> str:
        recall, precision = c["matched"] / max(c["true"], 1), c["matched"] / max(c["found"], 1)
        miss = "" if recall >= TARGET and precision >= TARGET and not c["debris"] else " ✗"
        return f"{recall:.2f} / {precision:.2f}{miss}"

    lines = ["| profile | " + " | ".join(f"{kind} {mpp:g} µm/px" for kind, mpp in columns) + " |",
             "|---|" + "---|" * len(columns)]
    lines += [f"| `{p}` | " + " | ".join(cell(results[p, k, m]) for k, m in columns) + " |" for p in profiles]
    met = sum(1 for c in results.values() if c["matched"] >= TARGET * c["true"] and c["matched"] >= TARGET * c["found"]
              and not c["debris"])
    lines += ["", f"Recall / precision within 5 µm; ✗ = below {TARGET} or a platelet, red cell or precipitate "
              f"counted as a white cell. Targets met in {met} of {len(results)} cells of the table.", "",
              "| profile | kind | µm/px | true cells | detections | matched | debris (outside any white cell) "
              "| split or duplicate | detection time |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (p, k, m), c in results.items():
        split = c["found"] - c["matched"] - c["debris"]
        lines.append(f"| `{p}` | {k} | {m:g} | {c['true']:.0f} | {c['found']:.0f} | {c['matched']:.0f} "
                     f"| {c['debris']:.0f} | {split:.0f} | {c['seconds']:.1f} s |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", type=Path, default=Path("bench_detect"), help="folder for generated scans")
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--size", type=int, default=40000, help="side of the large slide in px (0: skip)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--record", action="store_true", help="append the tables to docs/PERFORMANCE.md")
    parser.add_argument("--profiles", default=None, metavar="NAMES",
                        help="per-profile mode: comma-separated acquisition profiles, or 'all'")
    parser.add_argument("--mpps", default="0.08,0.25,0.5", help="pixel sizes of --profiles (µm/px)")
    parser.add_argument("--kinds", default="scan,fields", help="scan and/or fields, for --profiles")
    parser.add_argument("--cells", type=int, default=30, help="mean white cells per slide, for --profiles")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.workers)
        return
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.profiles:
        from milhema.synth.acquisition import PROFILES

        names = list(PROFILES) if args.profiles == "all" else args.profiles.split(",")
        mpps = [float(m) for m in args.mpps.split(",")]
        kinds = args.kinds.split(",")
        head = [f"## White-cell detection per acquisition profile ({platform.machine()}, {os.cpu_count()} CPUs, "
                f"{datetime.date.today().isoformat()})", "",
                f"`python tools/bench_detect.py --profiles {args.profiles} --mpps {args.mpps} --kinds {args.kinds} "
                f"--patients {args.patients} --cells {args.cells} --seed {args.seed} --workers {args.workers}`", ""]
        text = "\n".join(head + profiles_table(args.scratch, names, mpps, kinds, args.patients, args.cells,
                                                args.seed, args.workers))
        print(text)
        if args.record:
            record(text)
        return
    lines = [f"## White-cell detection ({platform.machine()}, {os.cpu_count()} CPUs, "
             f"{datetime.date.today().isoformat()})", "",
             f"`python tools/bench_detect.py --patients {args.patients} --size {args.size} "
             f"--workers {args.workers}`", ""]
    acc, _ = accuracy(args.scratch, args.patients, args.seed, args.workers)
    lines += acc + [""]
    if args.size:
        lines += scale(args.scratch, args.size, args.workers) + [""]
    text = "\n".join(lines)
    print(text)
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
