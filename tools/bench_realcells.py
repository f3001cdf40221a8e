"""The cell classifier on real white cells: the two wbc-seg sources, within and across (docs/RESULTS.md).

    OMP_NUM_THREADS=1 python tools/bench_realcells.py [--data ../shared/data/wbc-seg] [--scratch /tmp/bench_realcells]
        [--groups 10] [--folds 5] [--input-size 224]

The images stay where they are: each source (``cellavision/``: 100 images, ~0.08 µm/px;
``tecom/``: 300 images, ~0.16 µm/px; one white cell each, classes 1-5 of its ``labels.csv``) becomes
a class-folder dataset in ``--scratch`` made of symbolic links, ``<group>/<type>/<image>.png``, and a
cohort whose slides are the groups (crop folders with cell-type subfolders, the source's ``mpp``).
The images carry no patient: ``--groups`` groups, the images of each class dealt round-robin
after a seeded shuffle, stand in for patients, so the "patient-grouped" folds of ``cells train`` are
folds of images stratified by class.

Then, as a user would, through the command line, per feature set (``milhema embed --backbone none
--morphology``: the 16 handcrafted features at the source's µm per pixel; ``--backbone
timm/resnet18 --no-pretrained``: a randomly initialised ResNet-18 at ``--input-size`` px, the only
CNN available without downloading weights):

* **within a source**: ``milhema cells train`` (``--folds`` folds, MLP head, the five types): its
  out-of-fold balanced accuracy and 95 % interval (metrics.json, resampling the groups);
* **across sources**: ``cells train`` on one source, ``cells predict`` into a copy of the other's bags
  (the mean of the fold models), scored from the bags with the run's decision (``argmax p /
  training frequency``); the 95 % interval resamples images (1,000 bootstrap draws).

Balanced accuracy is the mean recall over the classes present; "4 types" leaves out basophils
(3 images in cellavision, 1 in tecom). Prints a markdown table; writes ``summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from milhema.bags import read_bag
from milhema.cells.model import decide
from milhema.cells.predict import load_cell_run
from milhema.train.metrics import balanced_accuracy

TYPES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]   # classes 1-5 of labels.csv
SOURCES = {"cellavision": 0.08, "tecom": 0.16}   # µm per pixel, estimated from cell sizes (the data's README)
CELLS = ["--set", f"cells.types=[{', '.join(TYPES)}]", "cells.neutrophil_types=[neutrophil]", "cells.attributes=[]"]


def milhema(*args: str) -> None:
    started = time.perf_counter()
    print("$ milhema " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "milhema", *args, "-q"], check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def class_folders(data: Path, source: str, root: Path, groups: int, seed: int) -> tuple[Path, dict[str, int]]:
    """A cohort of ``groups`` crop folders of symbolic links to the source's images, by type; the count per type."""
    with open(data / source / "labels.csv", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))[1:]
    by_type: dict[str, list[Path]] = {t: [] for t in TYPES}
    for image_id, label in rows:
        by_type[TYPES[int(label) - 1]].append(data / source / f"{int(image_id):03d}.png")
    rng = np.random.default_rng(seed)
    cohort = root / "cohort"
    if cohort.exists():
        shutil.rmtree(cohort)
    slides = []
    k = 0
    for cell_type, images in by_type.items():
        for image in [images[i] for i in rng.permutation(len(images))]:
            folder = cohort / "images" / f"G{k % groups:02d}" / cell_type
            folder.mkdir(parents=True, exist_ok=True)
            (folder / image.name).symlink_to(image.resolve())
            k += 1
    for g in range(groups):
        slides.append(f"{source}_G{g:02d},{source}_G{g:02d},images/G{g:02d},crops,{SOURCES[source]}")
    (cohort / "patients.csv").write_text("patient_id,label\n" + "".join(f"{source}_G{g:02d},\n" for g in range(groups)))
    (cohort / "slides.csv").write_text("slide_id,patient_id,source,kind,mpp\n" + "\n".join(slides) + "\n")
    return cohort, {t: len(v) for t, v in by_type.items()}


def scored(bags: Path, run: Path, seed: int) -> dict[str, Any]:
    """Balanced accuracy of the predictions ``cells predict`` wrote into ``bags``, with a bootstrap over images."""
    loaded = load_cell_run(run)
    prior = np.mean([m.type_prior.numpy() for m, _ in loaded.models], axis=0)
    y, probs = [], []
    for path in sorted(bags.glob("*.h5")):
        bag = read_bag(path, thumbnails=False)
        assert bag.predictions is not None and bag.cell_types is not None
        y += [TYPES.index(str(t)) for t in bag.cell_types]
        probs.append(bag.predictions.type_probs)
    truth, pred = np.array(y), decide(np.concatenate(probs), prior)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(len(truth), size=len(truth)) for _ in range(1000)]
    result = {}
    for name, keep in (("all", np.ones(len(truth), bool)), ("4 types", truth != TYPES.index("basophil"))):
        boot = [balanced_accuracy(truth[d], pred[d], len(TYPES)) for d in (draw[keep[draw]] for draw in draws)]
        result[name] = {"mean": balanced_accuracy(truth[keep], pred[keep], len(TYPES)),
                        "ci95": np.nanpercentile(boot, [2.5, 97.5]).tolist()}
    result["recall"] = {TYPES[c]: float(np.mean(pred[truth == c] == c)) for c in range(len(TYPES)) if (truth == c).any()}
    return result


def within(run: Path) -> dict[str, Any]:
    """The out-of-fold scores of a ``cells train`` run (metrics.json), and the balanced accuracy without basophils."""
    m = json.loads((run / "metrics.json").read_text())["type_metrics"]
    recall = {t: v["recall"] for t, v in m["per_type"].items() if v["support"]}
    four = [recall[t] for t in TYPES[:4] if t in recall]
    return {"all": m["balanced_accuracy"], "4 types": {"mean": float(np.mean(four))}, "recall": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/wbc-seg")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench_realcells"))
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    features = {"morphology": ["--backbone", "none", "--morphology"],
                "resnet18 (random weights)": ["--backbone", "timm/resnet18", "--no-pretrained",
                                              "--input-size", str(args.input_size)]}
    counts, results = {}, {}
    for source in SOURCES:
        cohort, counts[source] = class_folders(args.data, source, args.scratch / source, args.groups, args.seed)
        for k, (name, flags) in enumerate(features.items()):
            bags, run = args.scratch / source / f"bags{k}", args.scratch / source / f"run{k}"
            if not bags.is_dir():
                milhema("embed", "--cohort", str(cohort), "--out", str(bags), *flags, "--workers", "0")
            milhema("cells", "train", "--cohort", str(cohort), "--bags", str(bags), "--out", str(run),
                    "--folds", str(args.folds), *CELLS, "--overwrite")
            results[(name, source, source)] = within(run)
    for name in features:
        k = list(features).index(name)
        for train, test in (("cellavision", "tecom"), ("tecom", "cellavision")):
            copy = args.scratch / f"{train}_to_{test}_bags{k}"
            if copy.exists():
                shutil.rmtree(copy)
            shutil.copytree(args.scratch / test / f"bags{k}", copy)
            run = args.scratch / train / f"run{k}"
            milhema("cells", "predict", "--run", str(run), "--bags", str(copy),
                    "--cohort", str(args.scratch / test / "cohort"))
            results[(name, train, test)] = scored(copy, run, args.seed)
    print("\nimages per type: " + "; ".join(f"{s} " + ", ".join(f"{t} {n}" for t, n in c.items())
                                            for s, c in counts.items()))
    print("\n| features | trained on | tested on | balanced accuracy [95% CI] | 4 types (no basophil) | "
          "recall: " + " / ".join(TYPES) + " |")
    print("|---|---|---|---|---|---|")
    for (name, train, test), r in results.items():
        how = f"{args.folds}-fold cv" if train == test else test
        ci = r["all"].get("ci95")
        shown = f"{r['all']['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        recall = " / ".join(f"{r['recall'][t]:.2f}" if t in r["recall"] else "–" for t in TYPES)
        print(f"| {name} | {train} | {how} | {shown} | {r['4 types']['mean']:.3f} | {recall} |")
    print(f"\n({(time.perf_counter() - started) / 60:.1f} min)")
    (args.scratch / "summary.json").write_text(json.dumps(
        {"counts": counts, "results": [{"features": n, "train": a, "test": b, **r} for (n, a, b), r in results.items()]},
        indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
