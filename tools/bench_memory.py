"""Memory: train on a cohort larger than a cache should hold, streaming bags from HDF5.

Writes a synthetic cohort of --patients bag files of --cells cells × --dim float16 features
(2,000 × 2,000 × 512 ≈ 4 GB, as in the performance issue; kept in --work and reused), then runs
``milhema train`` on it as a subprocess with ``data.cache: false`` (and, with --compare-cache,
``data.cache: true``) and samples the resident memory of the process and its loader workers
every 0.2 s. Prints a table and, with --record, appends it to docs/PERFORMANCE.md.

    python tools/bench_memory.py [--patients 2000] [--cells 2000] [--dim 512] [--epochs 2]
                                 [--workers 0] [--compare-cache] [--work /tmp/milhema_bench_memory] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from perf_record import report  # tools/ is on sys.path when a tool runs as a script
from tqdm.auto import tqdm

from milhema.bags import read_bag_attrs, write_bag

CLASSES = ("a", "b", "c", "d")


def write_cohort(root: Path, patients: int, cells: int, dim: int, seed: int = 0) -> tuple[Path, Path, float]:
    """The cohort folder, the bag folder and the bags' size in GB; bags already written are kept."""
    cohort, bags = root / "cohort", root / "bags"
    (cohort / "no_images").mkdir(parents=True, exist_ok=True)  # slides.csv needs an existing source
    rows, slides = ["patient_id,label"], ["slide_id,patient_id,source"]
    for i in tqdm(range(patients), desc="bags", unit="bag"):
        pid, label = f"P{i:05d}", i % len(CLASSES)
        rows.append(f"{pid},{CLASSES[label]}")
        slides.append(f"{pid}_S0,{pid},no_images")
        path = bags / f"{pid}_S0.h5"
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])
        x = rng.normal(size=(cells, dim)).astype(np.float16)
        x[: cells // 10, label] += 2.0  # a few informative cells per bag
        write_bag(path, x, slide_id=f"{pid}_S0", patient_id=pid, backbone="bench/gaussian")
    (cohort / "patients.csv").write_text("\n".join(rows) + "\n")
    (cohort / "slides.csv").write_text("\n".join(slides) + "\n")
    size = sum(p.stat().st_size for p in bags.glob("*.h5")) / 1e9
    return cohort, bags, size


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_train(cohort: Path, bags: Path, out: Path, cache: bool, epochs: int, workers: int) -> tuple[float, float]:
    """Peak resident GB of ``milhema train`` (process tree) and its wall time in seconds."""
    sets = [f"data.cache={'true' if cache else 'false'}", f"data.workers={workers}", f"train.epochs={epochs}",
            f"train.patience={epochs + 1}", "data.classes=[a, b, c, d]", "data.patient_features=[]",
            "data.log_features=[]", "fusion.mode=none", "tracking.mode=disabled", "train.device=cpu"]
    cmd = [sys.executable, "-m", "milhema", "train", "--cohort", str(cohort), "--bags", str(bags),
           "--out", str(out), "--overwrite", "--quiet", "--set", *sets]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"milhema train failed with status {proc.returncode}")
    return peak / 1e9, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--compare-cache", action="store_true", help="also train with data.cache: true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/milhema_bench_memory"))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    cohort, bags, size = write_cohort(args.work, args.patients, args.cells, args.dim)
    n_cells = sum(int(read_bag_attrs(p)["n_cells"]) for p in list(bags.glob("*.h5"))[:1]) * args.patients
    rows = []
    for cache in ([False, True] if args.compare_cache else [False]):
        peak, wall = run_train(cohort, bags, args.work / f"run_cache_{cache}", cache, args.epochs, args.workers)
        rows.append(f"| `data.cache: {str(cache).lower()}` | {args.workers} | {peak:.2f} GB | {wall:.0f} s |")
        print(rows[-1], flush=True)
    lines = [f"## Training memory (CPU, {os.cpu_count()} cores, {datetime.date.today().isoformat()})", "",
             f"`python tools/bench_memory.py --patients {args.patients} --cells {args.cells} --dim {args.dim} "
             f"--epochs {args.epochs} --workers {args.workers}{' --compare-cache' if args.compare_cache else ''}`: "
             f"{args.patients:,} bags, {n_cells:,} cells × {args.dim} float16 features, {size:.1f} GB of bag files; "
             f"`milhema train` (ABMIL, {args.epochs} epochs, 128 cells sampled per bag and step, whole bags at "
             "validation); peak resident memory of the process and its loader workers, sampled every 0.2 s.", "",
             "| bags | loader workers | peak RSS | wall time |", "|---|---|---|---|", *rows]
    report(lines, args.record)


if __name__ == "__main__":
    main()
