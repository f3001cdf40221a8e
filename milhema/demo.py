"""``milhema demo``: the whole pipeline on a small simulated cohort, sized for a 2-core laptop.

synth -> embed (frozen backbone + morphology) -> patient-grouped cross-validation of ABMIL with
CBC fusion beside the baselines on the same folds -> printed table. Re-running it reuses the
cohort and the finished bags.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from milhema.config import load_config
from milhema.data.manifest import load_cohort
from milhema.embed.pipeline import EmbedOptions, embed_cohort
from milhema.errors import BagSettingsError
from milhema.explain.run import run_explain
from milhema.io import write_text
from milhema.synth.cohort import synthesize_cohort
from milhema.tracking import offline_runs
from milhema.train.baseline import cbc_design, cross_val_proba, mean_pooled_features, patient_folds
from milhema.train.cv import run_cv
from milhema.train.data import inspect_bags
from milhema.train.metrics import classification_metrics, format_ci


@dataclass(frozen=True)
class DemoSettings:
    patients: int = 60
    seed: int = 2026
    cells_per_slide: int = 80
    backbone: str = "timm/resnet18"
    input_size: int = 128
    folds: int = 4
    epochs: int = 150


def run_demo(out: str | Path = "demo_out", settings: DemoSettings | None = None, progress: bool = True) -> dict:
    """Run the demo into ``out`` and return the metrics it printed."""
    s = settings or DemoSettings()
    out = Path(out)
    cohort_dir, bags_dir = out / "cohort", out / "bags"
    started = time.perf_counter()
    # No pretrained weights ship with milhema, so the demo's CNN features are from random
    # weights; the MIL model reads the morphology block of the bags (data.feature_blocks).
    config = load_config(None, ["data.feature_blocks=[morphology]", f"cv.folds={s.folds}",
                                f"train.seed={s.seed}", f"train.epochs={s.epochs}"])
    data = config.data

    print(f"[1/4] simulated cohort: {s.patients} patients (AML, MDS, VEXAS, reactive), seed {s.seed}")
    if _same_cohort(cohort_dir, s):
        print(f"      reusing {cohort_dir}")
    else:
        synthesize_cohort(cohort_dir, s.patients, s.seed, cells_per_slide=s.cells_per_slide, progress=progress)
    cohort = load_cohort(cohort_dir, data.classes, data.patient_features, require_labels=True)
    n_cells = sum(len(list(sl.source.glob("*.png"))) for sl in cohort.slides)
    print(f"      {len(cohort.patients)} patients, {len(cohort.slides)} slides, {n_cells} cells")

    print(f"[2/4] embedding with {s.backbone} (random weights: no pretrained file is bundled) "
          f"+ morphology features, input {s.input_size} px")
    options = EmbedOptions(backbone=s.backbone, pretrained=False, morphology=True, input_size=s.input_size,
                           progress=progress)
    try:
        report = embed_cohort(cohort, bags_dir, options)
    except BagSettingsError:
        # Bags of an earlier demo made another way (an older milhema's morphology, say). The folder
        # is the demo's own, so they are redone rather than sending a newcomer to --overwrite.
        print(f"      {bags_dir} holds bags made with other settings (an earlier milhema): embedding again")
        report = embed_cohort(cohort, bags_dir, replace(options, overwrite=True))
    print(f"      {report.summary()}")

    print(f"[3/4] {s.folds}-fold patient-grouped cross-validation: ABMIL + CBC fusion and baselines "
          "(on the morphology features)")
    run = run_cv(config, cohort, bags_dir, out / "run", overwrite=True, progress=progress)
    ids = cohort.patient_ids
    y = cohort.labels(ids)
    splits = patient_folds(y, s.folds, s.seed)  # the folds run_cv used (same seed)
    k = len(cohort.classes)
    cbc = cbc_design(cohort, ids, data.log_features)
    columns = inspect_bags(cohort, bags_dir, ids, data.feature_blocks).columns
    cells = mean_pooled_features(cohort, bags_dir, ids, columns)
    results = {
        "CBC only": run["baselines"]["cbc_only"]["patient"],
        "mean-pooled cells + CBC": classification_metrics(
            y, cross_val_proba(np.hstack([cells, cbc]), y, splits, k, s.seed), cohort.classes),
        f"{run['model']} + CBC ({run['fusion']})": run["patient"],
    }
    _print_table(results)
    print(f"run folder (predictions, cell scores, checkpoints): {out / 'run'}")
    for folder in offline_runs(out / "run"):
        print(f"W&B offline run: wandb sync {folder}")
    write_text(out / "demo_metrics.json", json.dumps(results, indent=2) + "\n")

    patient = next((p for p in ids if cohort.patients[p].label == cohort.classes[0]), ids[0])
    print(f"\n[4/4] patient report for {patient} ({cohort.patients[patient].label}): attention over its cells, "
          "galleries, CBC flags")
    run_explain(out / "run", cohort, bags_dir, out / "explain", patients=[patient], overwrite=True,
                progress=progress)
    print(f"      open {out / 'explain' / patient / 'report.html'} in a browser")
    print(f"\ndone in {time.perf_counter() - started:.0f} s; metrics in {out / 'demo_metrics.json'}")
    return results


def _same_cohort(cohort_dir: Path, s: DemoSettings) -> bool:
    meta = cohort_dir / "synth.json"
    if not meta.is_file():
        return False
    info = json.loads(meta.read_text(encoding="utf-8"))
    return (info.get("seed"), info.get("patients"), info.get("cells_per_slide")) == (s.seed, s.patients,
                                                                                     s.cells_per_slide)


def _print_table(results: dict[str, dict]) -> None:
    header = f"{'model':<26}{'balanced acc.':>22}{'macro-F1':>22}{'macro-AUROC':>22}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, m in results.items():
        print(f"{name:<26}{format_ci(m['balanced_accuracy']):>22}{format_ci(m['macro_f1']):>22}"
              f"{format_ci(m['macro_auroc']):>22}")
    print("(patient level, out-of-fold; [95% bootstrap CI over patients])")
