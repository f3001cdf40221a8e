"""Cross-validate config variants on cohorts from several simulation seeds and print one table.

    python tools/seed_table.py --data c11:b11 --data c12:b12 --data c13:b13 --out runs/seeds \\
        --variant "abmil=configs/abmil.yaml" --variant "abmil-1=configs/abmil.yaml:model.multi_branch=false" \\
        [--eval-subsample 8] [--markdown table.md] [--record] [--title "..."]

Each ``--variant NAME=CONFIG[:key=value:...]`` is run by `milhema cv` on every ``--data
COHORT:BAGS`` into ``OUT/NAME/<cohort folder>`` (a finished run there is reused, so variants can
be run by separate processes and the table assembled afterwards). Every column is the mean over
the cohorts, followed by the per-cohort values; the hyper-parameters are the config's, frozen (no
value is chosen on these cohorts).

``--eval-subsample K`` also scores each fold's checkpoint on its test patients with subsampled
evaluation (``data.eval_subsample: K``: the mean of K predictions of ``data.max_cells``-cell
subsamples) beside the whole-bag evaluation cv used: the same trained models, two ways of
reading a bag. ``--record`` appends the table to docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_record import RESULTS_MD, report  # noqa: E402

from milhema.config import load_config  # noqa: E402
from milhema.data import load_cohort  # noqa: E402
from milhema.train.checkpoint import load_checkpoint  # noqa: E402
from milhema.train.cv import run_cv  # noqa: E402
from milhema.train.data import BagStore  # noqa: E402
from milhema.train.inference import predict  # noqa: E402
from milhema.train.metrics import balanced_accuracy, macro_auroc  # noqa: E402


def parse_variant(text: str) -> tuple[str, Path | None, list[str]]:
    """``NAME=CONFIG[:key=value...]`` -> (name, config path or None for ``-``, overrides)."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise SystemExit(f"--variant {text!r}: expected NAME=CONFIG[:key=value...]")
    config, *overrides = rest.split(":")
    return name, None if config in ("", "-") else Path(config), overrides


def parse_data(items: Sequence[str]) -> list[tuple[Path, Path]]:
    """``COHORT:BAGS`` items -> (cohort, bags) paths; the cohort folders' names must differ, since each
    run lives in ``OUT/<variant>/<cohort folder name>`` (two ``.../cohort`` would share, and reuse, one run)."""
    data = [(Path(c), Path(b)) for c, _, b in (d.partition(":") for d in items)]
    names = [c.name for c, _ in data]
    if len(set(names)) < len(names):
        raise SystemExit(f"--data: the cohort folders need distinct names (got {names}); link them under new names")
    return data


def run_variant(name: str, config: Path | None, overrides: Sequence[str], cohort_dir: Path, bags: Path,
                out: Path) -> dict[str, Any]:
    """metrics.json of the variant on one cohort (run now unless a finished run is there: ``cv --resume``)."""
    folder = out / name / cohort_dir.name
    settings = load_config(config, ["tracking.mode=disabled", *overrides])
    cohort = load_cohort(cohort_dir, settings.data.classes, settings.data.patient_features)
    # --resume: a complete run is reused, an interrupted one continued from its finished folds.
    return run_cv(settings, cohort, bags, folder, resume=True, progress=False)


def rescore(folder: Path, cohort_dir: Path, bags: Path, draws: int) -> dict[str, float]:
    """Balanced accuracy and macro-AUROC of a cv run's repeat-0 checkpoints on their test patients,
    with whole bags and with ``draws`` subsampled evaluations of ``data.max_cells`` cells (kept in
    ``folder/rescore_<draws>.json``)."""
    saved = folder / f"rescore_{draws}.json"   # beside the run: computed once
    if saved.is_file():
        return dict(json.loads(saved.read_text()))
    settings = load_config(folder / "config.yaml")
    cohort = load_cohort(cohort_dir, settings.data.classes, settings.data.patient_features)
    k = len(cohort.classes)
    ys, whole, sub = [], [], []
    for meta_path in sorted((folder / "checkpoints").glob("r0_f*.json")):
        model, meta = load_checkpoint(meta_path.with_suffix(""))
        store = BagStore(cohort, bags, meta["spec"]["views"], columns=meta["bags"]["columns"])
        test = list(store.many(meta["test_patients"]))
        cpu = torch.device("cpu")
        model.eval_subsample = None
        whole.append(predict(model, test, settings.train.batch_size, device=cpu).probs)
        model.eval_subsample = (draws, settings.data.max_cells)
        sub.append(predict(model, test, settings.train.batch_size, device=cpu).probs)
        ys.append(cohort.labels(meta["test_patients"]))
    y = np.concatenate(ys)
    pw, ps = np.concatenate(whole), np.concatenate(sub)
    scores = {"ba_whole": balanced_accuracy(y, pw.argmax(1), k), "ba_sub": balanced_accuracy(y, ps.argmax(1), k),
              "auroc_whole": macro_auroc(y, pw, k), "auroc_sub": macro_auroc(y, ps, k)}
    saved.write_text(json.dumps(scores) + "\n")
    return scores


def columns(m: dict[str, Any]) -> dict[str, float]:
    """The numbers of one run that the table can show (those the task has)."""
    out: dict[str, float] = {}
    if "patient" in m:
        p = m["patient"]
        out |= {"balanced accuracy": p["balanced_accuracy"]["mean"], "macro-F1": p["macro_f1"]["mean"],
                "macro-AUROC": p["macro_auroc"]["mean"]}
        if m.get("baselines", {}).get("cbc_only"):
            out["CBC-only balanced accuracy"] = m["baselines"]["cbc_only"]["patient"]["balanced_accuracy"]["mean"]
    if m.get("attention", {}).get("diagnostic_auroc", {}).get("mean") is not None:
        out["attention AUROC"] = m["attention"]["diagnostic_auroc"]["mean"]
    if m.get("occlusion", {}).get("diagnostic_auroc", {}).get("mean") is not None:
        out["occlusion AUROC"] = m["occlusion"]["diagnostic_auroc"]["mean"]
    if "survival" in m:
        s = m["survival"]
        out["c-index"] = s["c_index"]["mean"]
        if s["baselines"].get("cbc_cox"):
            out["CBC-only Cox c-index"] = s["baselines"]["cbc_cox"]["c_index"]["mean"]
        out["log-rank p"] = s["logrank_p"]
    return out


def cell(values: Sequence[float | None], name: str) -> str:
    """Mean over the cohorts that have the value, then each cohort's value (— where absent)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "—"
    p_value = name == "log-rank p"
    each = ", ".join("—" if v is None or not math.isfinite(v) else f"{v:.0e}" if p_value else f"{v:.2f}"
                     for v in values)
    if p_value:   # the geometric mean
        return f"{float(np.exp(np.mean(np.log(finite)))):.0e} ({each})"
    return f"**{np.mean(finite):.3f}** ({each})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="COHORT:BAGS (repeat per seed)")
    parser.add_argument("--variant", action="append", required=True, help="NAME=CONFIG[:key=value...]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-subsample", type=int, default=0, metavar="K")
    parser.add_argument("--only", nargs="*", default=None, help="columns to show (default: all the runs have)")
    parser.add_argument("--existing", action="store_true",
                        help="start no run: tabulate the finished ones (a missing run counts as absent)")
    parser.add_argument("--title", default="## Seed table")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--record", action="store_true", help="append the table to docs/RESULTS.md")
    args = parser.parse_args()
    data = parse_data(args.data)
    rows: list[tuple[str, dict[str, dict[str, float]]]] = []   # variant -> cohort -> column -> value
    for text in args.variant:
        name, config, overrides = parse_variant(text)
        per_cohort: dict[str, dict[str, float]] = {}
        for cohort_dir, bags in data:
            if args.existing and not (args.out / name / cohort_dir.name / "metrics.json").is_file():
                print(f"{name} on {cohort_dir.name}: no finished run", flush=True)
                continue
            m = run_variant(name, config, overrides, cohort_dir, bags, args.out)
            found = columns(m)
            if args.eval_subsample and "patient" in m:
                r = rescore(args.out / name / cohort_dir.name, cohort_dir, bags, args.eval_subsample)
                found |= {"balanced accuracy, whole bags": r["ba_whole"],
                          f"balanced accuracy, mean of {args.eval_subsample} subsamples": r["ba_sub"],
                          "macro-AUROC, whole bags": r["auroc_whole"],
                          f"macro-AUROC, mean of {args.eval_subsample} subsamples": r["auroc_sub"]}
            per_cohort[cohort_dir.name] = found
            print(f"{name} on {cohort_dir.name}: " + ", ".join(f"{k} {v:.3g}" for k, v in found.items()), flush=True)
        rows.append((name, per_cohort))
    names = list(dict.fromkeys(k for _, v in rows for found in v.values() for k in found))
    if args.only:
        names = [n for n in names if n in args.only]
    cohorts = [c.name for c, _ in data]
    lines = [args.title, "", f"Mean over the cohorts, then the value of each ({', '.join(cohorts)}; — = not run).", "",
             "| variant | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell([v.get(c, {}).get(n) for c in cohorts], n) for n in names) + " |"
              for name, v in rows if v]
    text = report(lines, args.record, RESULTS_MD)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
