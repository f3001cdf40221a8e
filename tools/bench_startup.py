"""Start-up of ``milhema train`` (issue 19): seconds from process start to the first epoch, by phase.

    python tools/bench_startup.py --cohort COHORT --bags BAGS [--repeats 3] [--before SRC] [--set KEY=VALUE ...]

Each repeat starts a fresh interpreter that runs ``milhema.cli.main(["train", ...])`` with
stamps around the library's own steps (imports, ``load_config``, ``load_cohort``, ``prepare``'s
``inspect_bags`` and ``with_differential``, the W&B tracker, ``build_model``, fitting the feature
normalisation, which reads every training bag) and stops after the first epoch. ``--before SRC``
(a folder holding an older ``milhema/`` package, e.g. from ``git archive``) runs the same
probe on that code as well, interleaved with the working tree's, so the two are compared
under the same load. Prints the median seconds of each phase over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child. Wrappers stamp a phase when a step returns; the first epoch's callback
# prints the stamps and ends the process (nothing after the first epoch is measured).
_PROBE = r"""
import json, os, sys, time
stamps = [("interpreter start", float(sys.argv[1]))]
def stamp(name):
    stamps.append((name, time.time()))
stamp("python started")
import milhema.cli
stamp("import milhema.cli")
from milhema.train import distributed
from milhema.train import run as run_mod
stamp("import training modules")
import milhema.config, milhema.data.manifest
from milhema.train import data as data_mod
from milhema.train.inputs import FeatureNorm

def wrap(owner, name, label):
    original = getattr(owner, name)
    def wrapped(*a, **kw):
        out = original(*a, **kw)
        stamp(label)
        return out
    setattr(owner, name, wrapped)

wrap(milhema.config, "load_config", "load_config")
wrap(milhema.data.manifest, "load_cohort", "load_cohort (manifest)")
wrap(run_mod, "inspect_bags", "inspect_bags (bag attributes)")
wrap(run_mod, "with_differential", "with_differential")
wrap(run_mod, "check_inputs", "rest of prepare (model spec)")
wrap(run_mod, "start_tracker", "W&B tracker")
wrap(run_mod, "build_model", "build_model")
wrap(FeatureNorm, "fit", "feature normalisation (reads the training bags)")
original_fit = run_mod.fit
def fit(*a, **kw):
    stamp("rest of set-up (CBC encoder, loader)")
    return original_fit(*a, **kw)
run_mod.fit = fit
original_writer = run_mod.history_writer
def history_writer(*a, **kw):
    log = original_writer(*a, **kw)
    def first(record):
        stamp("first epoch")
        print("STAMPS " + json.dumps(stamps), flush=True)
        os._exit(0)
    return first
run_mod.history_writer = history_writer
milhema.cli.main(sys.argv[2:])
"""


def probe(src: Path, argv: list[str]) -> list[tuple[str, float]]:
    """One fresh ``milhema train`` on the package under ``src``: (phase, seconds) up to the first epoch."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.time()
    done = subprocess.run([sys.executable, "-c", _PROBE, repr(start), *argv], capture_output=True, text=True, env=env,
                          cwd=src)
    line = next((x for x in done.stdout.splitlines() if x.startswith("STAMPS ")), None)
    if line is None:
        raise SystemExit(f"probe failed ({done.returncode}):\n{done.stderr[-3000:]}")
    stamps = json.loads(line[len("STAMPS "):])
    return [(name, t - stamps[i][1]) for i, (name, t) in enumerate(stamps[1:])] + [("to first epoch", stamps[-1][1] - start)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--bags", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="folder with an older milhema/ to compare, interleaved")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides passed to milhema train")
    args = parser.parse_args()
    arms = {"after": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    results: dict[str, list[list[tuple[str, float]]]] = {name: [] for name in arms}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for name, src in (list(arms.items()) if k % 2 == 0 else list(arms.items())[::-1]):
                out = Path(tmp) / f"{name}{k}"
                argv = ["train", "--cohort", str(args.cohort.resolve()), "--bags", str(args.bags.resolve()), "--out",
                        str(out), "-q", "--set", "train.epochs=1", *args.set]
                results[name].append(probe(src, argv))
                print(f"{name} repeat {k}: " + ", ".join(f"{phase} {sec:.2f}" for phase, sec in results[name][-1]
                                                       if sec >= 0.05), flush=True)
    phases = [p for p, _ in results["after"][0]]
    names = list(arms)[::-1]
    lines = [f"`python tools/bench_startup.py {' '.join(sys.argv[1:])}`: median of {args.repeats} fresh processes, "
             f"seconds; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.", "",
             "| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for phase in phases:
        cells = []
        for name in names:
            values = [dict(r).get(phase) for r in results[name]]
            cells.append("—" if None in values else f"{statistics.median(v for v in values if v is not None):.2f}")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
