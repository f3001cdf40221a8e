"""Cross-validate every model family on one cohort and print the table of the MIL issue.

    python tools/model_table.py --cohort COHORT --bags BAGS --out runs/ [--models abmil dsmil ...]
                                [--set key=value ...] [--markdown results.md]

Each family runs `milhema cv` with its `configs/<name>.yaml` plus the `--set` overrides, on the
same patient folds (same seed); the CBC-only baseline is computed on those folds too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from milhema.config import load_config
from milhema.data import load_cohort
from milhema.train.cv import run_cv
from milhema.train.metrics import format_ci

FAMILIES = ("abmil", "dsmil", "transformer", "multiview", "graph")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--bags", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", type=Path, default=Path(__file__).resolve().parent.parent / "configs")
    parser.add_argument("--models", nargs="+", default=list(FAMILIES))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    header = "| model | fusion | balanced accuracy | macro-F1 | macro-AUROC | CBC-only balanced accuracy | wall time |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    print(header)
    for name in args.models:
        settings = load_config(args.configs / f"{name}.yaml", args.set)
        cohort = load_cohort(args.cohort, settings.data.classes, settings.data.patient_features)
        started = time.perf_counter()
        m = run_cv(settings, cohort, args.bags, args.out / name, overwrite=True, progress=False)
        p, base = m["patient"], m["baselines"]["cbc_only"]["patient"]
        line = (f"| {name} | {m['fusion']} | {format_ci(p['balanced_accuracy'])} | {format_ci(p['macro_f1'])} | "
                f"{format_ci(p['macro_auroc'])} | {format_ci(base['balanced_accuracy'])} | "
                f"{time.perf_counter() - started:.0f} s |")
        lines.append(line)
        print(line, flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
