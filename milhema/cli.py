"""The ``milhema`` command line. Each subcommand parses its options and calls the library.

Bad input raises a :class:`~milhema.errors.MilhemaError`; it is printed as one line and the
command exits with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from milhema.errors import MilhemaError
from milhema.version import __version__

if TYPE_CHECKING:
    from milhema.data.manifest import Cohort
    from milhema.settings import Settings

EXIT_BAD_INPUT = 2
BAGS_HELP = ("folder of bags from milhema embed (not needed when slides.csv's sources are feature files, "
             "as milhema import embeddings writes)")


def _synth(args: argparse.Namespace) -> int:
    from milhema.synth.cohort import synthesize_cohort

    # Scans and fields are what a detector meets in many labs: multi-centre unless asked otherwise.
    acquisition = args.acquisition or ("mixed" if args.wsi or args.fields else "default")
    out = synthesize_cohort(args.out, args.patients, args.seed, args.difficulty, cells_per_slide=args.cells,
                            crop_px=args.crop_px, wsi=args.wsi, wsi_size=args.wsi_size, workers=args.workers,
                            progress=not args.quiet, acquisition=acquisition, mpp=args.mpp, fields=args.fields)
    kind = "scanned smears" if args.wsi else "folders of field photographs" if args.fields else "crop folders"
    look = "" if acquisition == "default" else f", acquisition {acquisition}"
    print(f"wrote a simulated cohort of {args.patients} patients ({kind}{look}) to {out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from milhema.importers import ImportOptions, parse_class_map, read_layout, write_cohort

    options = ImportOptions(mpp=args.mpp, classes=parse_class_map(args.classes), labels=args.labels,
                            metadata=args.metadata)
    imported = read_layout(args.layout, args.src, options, out=None if args.dry_run else args.out,
                           overwrite=args.overwrite, progress=not args.quiet)
    for line in imported.summary():
        print(line)
    if args.dry_run:
        print(f"dry run: nothing written (without --dry-run: {args.out}/patients.csv, slides.csv, config.yaml)")
        return 0
    write_cohort(imported, args.out, options, args.src, overwrite=args.overwrite)
    config = args.out / "config.yaml"
    print(f"wrote {args.out}: patients.csv, slides.csv, config.yaml (classes {', '.join(imported.classes) or 'none'}), "
          "import.json")
    if imported.embedded:
        print(f"next: milhema cv --config {config} --cohort {args.out} --out runs/{args.out.name}")
    else:
        print(f"next: milhema embed --config {config} --cohort {args.out} --out {args.out}_bags "
              "--backbone BACKBONE --weights FILE")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from milhema.config import load_config
    from milhema.data.manifest import load_cohort
    from milhema.embed.pipeline import EmbedOptions, embed_cohort, parse_shard

    settings = load_config(args.config, args.set)
    cohort = load_cohort(args.cohort, settings.data.classes, ())
    options = EmbedOptions(
        backbone=args.backbone, weights=args.weights, pretrained=not args.no_pretrained, morphology=args.morphology,
        input_size=args.input_size, device=args.device, batch_size=args.batch_size, workers=args.workers,
        shard=parse_shard(args.shard), overwrite=args.overwrite, fail_on_bad_image=args.fail_on_bad_image,
        progress=not args.quiet, crop_um=args.crop_um, stain_normalize=args.stain_normalize,
        stain_reference=args.stain_reference, **({"detector": args.detector} if args.detector else {}),
    )
    report = embed_cohort(cohort, args.out, options)
    print(report.summary())
    return 0


def _load_for_training(args: argparse.Namespace, extra: list[str]) -> tuple[Settings, Cohort]:
    from milhema.config import load_config
    from milhema.data.manifest import load_cohort

    settings = load_config(args.config, [*extra, *args.set])
    return settings, load_cohort(args.cohort, settings.data.classes, settings.data.patient_features)


def _train(args: argparse.Namespace) -> int:
    from milhema.train import distributed
    from milhema.train.run import run_train

    settings, cohort = _load_for_training(args, [])
    with distributed.job():
        metrics = run_train(settings, cohort, args.bags, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if distributed.launched_rank() != 0:  # under torchrun, rank 0 reports
        return 0
    scores = []
    if "early_stopping_split" in metrics:
        scores.append(f"balanced accuracy {metrics['early_stopping_split']['balanced_accuracy']['mean']:.3f}")
    if "early_stopping_split_survival" in metrics:
        scores.append(f"c-index {metrics['early_stopping_split_survival']['c_index']['mean']:.3f}")
    print(f"trained {metrics['model']} on {metrics['n_train']} patients ({metrics['epochs_run']} epochs); "
          f"{', '.join(scores)} on the {metrics['n_val']} patients that chose the stopping epoch (optimistic; "
          f"milhema cv for an estimate); run in {args.out}")
    _print_sync_hint(args.out)
    return 0


def _cv(args: argparse.Namespace) -> int:
    from milhema.data.cbc import is_cbc_quantity
    from milhema.train import distributed
    from milhema.train.cv import run_cv
    from milhema.train.metrics import format_ci

    extra = [f"cv.folds={args.folds}"] if args.folds else []
    extra += [f"cv.repeats={args.repeats}"] if args.repeats else []
    settings, cohort = _load_for_training(args, extra)
    if args.resume and distributed.launched_rank() == 0:
        _print_resume_state(args.out)
    with distributed.job():
        m = run_cv(settings, cohort, args.bags, args.out, overwrite=args.overwrite, resume=args.resume,
                   progress=not args.quiet)
    if distributed.launched_rank() != 0:  # under torchrun, rank 0 reports
        return 0
    fused = "cells only" if m["fusion"] == "none" else f"patient features fused by '{m['fusion']}'"
    print(f"{m['model']}, {fused}, {m['folds']}-fold cv x {m['repeats']}, {m['n_patients']} patients")
    # The baseline keeps its contract name; the line says what it read.
    only = "CBC only" if all(is_cbc_quantity(c) for c in settings.data.patient_features) else "features only"
    if "patient" in m:
        base = m["baselines"].get("cbc_only", {}).get("patient")
        for name in ("balanced_accuracy", "macro_f1", "macro_auroc"):
            beside = f"{only} {format_ci(base[name])}" if base else ""
            print(f"  {name:<18} {format_ci(m['patient'][name]):<22} {beside}".rstrip())
    if "survival" in m:
        s = m["survival"]
        cox = s["baselines"].get("cbc_cox")
        beside = f" CBC-only Cox {format_ci(cox['c_index'])};" if cox else ""
        print(f"  {'c_index':<18} {format_ci(s['c_index']):<22}{beside} log-rank p {s['logrank_p']:.2g} over risk "
              f"tertiles ({s['events']} events)")
    for note in m.get("notes", []):
        print(f"  ({note})")
    print(f"run in {args.out}")
    _print_sync_hint(args.out)
    return 0


def _print_resume_state(out: Path) -> None:
    from milhema.train.resume import run_state

    state, finished = run_state(out)
    if state == "complete":
        print(f"{out} is already a complete run: nothing to resume")
    elif state == "interrupted":
        print(f"resuming the interrupted run of {out}: {finished} finished fold(s) found")


def _print_sync_hint(run: Path) -> None:
    from milhema.tracking import offline_runs

    for folder in offline_runs(run):
        print(f"W&B offline run: wandb sync {folder}")


def _predict(args: argparse.Namespace) -> int:
    from milhema.data.manifest import load_cohort
    from milhema.train.metrics import format_ci
    from milhema.train.predict import run_predict, run_settings

    data = run_settings(args.run).data
    cohort = load_cohort(args.cohort, data.classes, data.patient_features, absent_features="missing")
    done = run_predict(args.run, cohort, args.bags, args.out, ensemble=args.ensemble, overwrite=args.overwrite,
                       device=args.device)
    print(f"predictions for {len(cohort.patients)} patients in {args.out}")
    m = done["metrics"]
    if m is not None:
        base = m["baselines"].get("cbc_only", {}).get("patient")
        print(f"  {m['n_patients']} patients have a label ({m['out_of_fold_patients']} predicted out of fold):")
        for name in ("balanced_accuracy", "macro_auroc", "ece"):
            beside = f"CBC only {format_ci(base[name])}" if base else ""
            print(f"  {name:<18} {format_ci(m['patient'][name]):<22} {beside}".rstrip())
        if "baselines_note" in m:
            print(f"  ({m['baselines_note']})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from milhema.data.manifest import load_cohort
    from milhema.explain.run import run_explain
    from milhema.train.predict import run_settings

    data = run_settings(args.run).data
    cohort = load_cohort(args.cohort, data.classes, data.patient_features, absent_features="missing")
    summary = run_explain(args.run, cohort, args.bags, args.out, patients=args.patient, method=args.method,
                          top_k=args.top_k, overwrite=args.overwrite, device=args.device, progress=not args.quiet)
    print(f"explained {summary['n_patients']} patients ({args.method} scores) in {args.out}")
    return 0


def _cells_train(args: argparse.Namespace) -> int:
    from milhema.cells.annotations import labels_summary
    from milhema.cells.run import run_cells_train
    from milhema.config import load_config
    from milhema.data.manifest import load_cohort
    from milhema.train.metrics import format_ci

    extra = [f"cells.folds={args.folds}"] if args.folds else []
    settings = load_config(args.config, [*extra, *args.set])
    cohort = load_cohort(args.cohort, settings.data.classes, ())
    m = run_cells_train(settings, cohort, args.bags, args.out, labels=args.labels, overwrite=args.overwrite,
                        progress=not args.quiet)
    report = m["annotations"]
    print(f"{report['annotated']} annotated cells of {report['cells']} ({report['not_annotated']} without annotation) "
          f"from {m['n_patients']} patients; {m['head']} head on {m['backbone']} features, {m['folds']}-fold "
          + ("cv by cell (no patients to group by)" if m["evaluation"].startswith("out of fold, by cell")
             else "patient-grouped cv"))
    if "labels" in report:
        print("  " + labels_summary(report["labels"]))
    if report["merged"]:
        print("  merged: " + ", ".join(f"{k} -> {v['type']} ({v['cells']})" for k, v in report["merged"].items()))
    if report["unknown"]:
        shown = [f"{k!r} ({v['cells']} cells" + (f"; did you mean {v['closest']!r}?" if v["closest"] else "") + ")"
                 for k, v in list(report["unknown"].items())[:8]]
        print(f"  left out, not one of cells.types or cells.merge: {', '.join(shown)}")
    t = m["type_metrics"]
    print(f"  balanced accuracy  {format_ci(t['balanced_accuracy'])} out of fold (chance "
          f"{t['chance_balanced_accuracy']:.2f}); differential error {m['differential']['mae_pp_mean_over_types']:.2f} "
          "percentage points (mean over types)")
    for name, a in m.get("attribute_metrics", {}).items():
        if not 0 < a["positives"] < a["annotated"]:
            print(f"  {name:<18} not scored: {a['positives']} positive of {a['annotated']} annotated cells")
            continue
        print(f"  {name:<18} AUROC {format_ci(a['auroc'])}, average precision {format_ci(a['average_precision'])} "
              f"({a['positives']} positive cells)")
    print(f"run in {args.out}; next: milhema cells predict --run {args.out} --bags {args.bags or 'BAGS'}")
    return 0


def _cells_cohort(folder: Path, run: Path) -> Cohort:
    """The cohort whose slides' bags a cells run reads (diagnoses play no part: the cohort is read with the
    classes of the config the classifier was trained with)."""
    from milhema.config import DEFAULTS
    from milhema.data.manifest import load_cohort
    from milhema.train.predict import run_settings

    classes = run_settings(run).data.classes if (run / "config.yaml").is_file() else DEFAULTS["data"]["classes"]
    return load_cohort(folder, classes, ())


def _cells_predict(args: argparse.Namespace) -> int:
    from milhema.cells.predict import run_cells_predict

    cohort = _cells_cohort(args.cohort, args.run) if args.cohort is not None else None
    done = run_cells_predict(args.run, args.bags, cohort, overwrite=args.overwrite, device=args.device,
                             progress=not args.quiet)
    if not done.written:
        print(f"all {len(done.skipped)} bags already carry the predictions of {args.run}: nothing to do")
        return 0
    already = f"; {len(done.skipped)} already carried them" if done.skipped else ""
    held = f" ({done.held_out} slides of the run's patients by the fold model that held them out)" if done.held_out else ""
    print(f"cell type probabilities for {done.cells} cells written into {len(done.written)} bags{held}{already} "
          "(bag format version 2)")
    return 0


def _cells_propose(args: argparse.Namespace) -> int:
    from milhema.cells.active import CSV_FILE, HTML_FILE, propose, write_proposal

    cohort = _cells_cohort(args.cohort, args.run) if args.cohort is not None else None
    found = propose(args.run, args.bags, cohort, args.budget, args.strategy, seed=args.seed, labels=args.labels,
                    device=args.device)
    write_proposal(found, args.out, overwrite=args.overwrite)
    info = found.info
    short = f" (only {info['unannotated']} cells are unannotated)" if info["proposed"] < info["budget"] else ""
    print(f"proposed {info['proposed']} of {info['unannotated']} unannotated cells by {info['strategy']}{short}: "
          f"look at {args.out / HTML_FILE}, fill the label column of {args.out / CSV_FILE}, then "
          f"milhema cells train ... --labels {args.out / CSV_FILE}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from milhema.demo import run_demo

    run_demo(args.out, progress=not args.quiet)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from milhema.importers import IMPORTERS, list_importers  # light: no torch
    parser = argparse.ArgumentParser(
        prog="milhema", description="Patient-level diagnosis in hematology by multiple-instance learning.")
    parser.add_argument("--version", action="version", version=f"milhema {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="more log messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from milhema.synth.acquisition import MIXED_PROFILE, PROFILE_NAMES, PROFILES  # light: numpy only
    profiles = "\n".join([f"  {p.name:<18} {p.describe()}\n  {'':<18} {p.summary}" for p in PROFILES.values()]
                          + [f"  {MIXED_PROFILE:<18} one named profile per slide (a multi-centre cohort)"])
    p = sub.add_parser("synth", parents=[common], help="write a simulated cohort (manifest, crops, per-cell truth)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"acquisition profiles (--acquisition; docs/SIMULATION.md):\n{profiles}")
    p.add_argument("--out", required=True, type=Path, help="new folder for the cohort")
    p.add_argument("--patients", type=_positive_int, default=40, help="number of patients (default 40)")
    p.add_argument("--seed", type=int, default=0, help="same seed = byte-identical cohort (default 0)")
    p.add_argument("--difficulty", choices=("easy", "default", "hard"), default="default",
                   help="how rare the diagnostic cells are (see docs/SIMULATION.md)")
    p.add_argument("--cells", type=_positive_int, default=None,
                   help="mean white cells per slide (default 120; 300 with --wsi or --fields)")
    p.add_argument("--wsi", action="store_true",
                   help="write each slide as a pyramidal TIFF scan of a smear (0.25 µm/px, or the profile's) instead of crops")
    p.add_argument("--wsi-size", type=_positive_int, default=None,
                   help="side of each scan in px (default: room for its cells at a typical density)")
    p.add_argument("--fields", action="store_true",
                   help="write each slide as a folder of photographed fields (kind=fields) instead of crops")
    p.add_argument("--acquisition", choices=PROFILE_NAMES, default=None, metavar="PROFILE",
                   help="how the smears were stained and imaged (profiles below). Default: mixed (one profile "
                        "per slide) with --wsi or --fields, else default (the simulator's own look, unchanged)")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per pixel of every slide instead of the profile's (0.05-2)")
    p.add_argument("--crop-px", type=_positive_int, default=None,
                   help="crop side in pixels, spanning 24 µm (default 96, or 24 µm at the profile's pixel size)")
    p.add_argument("--workers", type=_positive_int, default=None, help="rendering processes (default: CPUs)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("import", parents=[common], help="write a cohort manifest for a public dataset layout",
                       description="Write patients.csv and slides.csv for a dataset in a known layout. Images and "
                                   "feature files are referenced where they are, never copied or changed.")
    p.add_argument("layout", choices=list_importers(), metavar="LAYOUT",
                   help="; ".join(f"{name}: {imp.layout}" for name, imp in sorted(IMPORTERS.items())))
    p.add_argument("src", type=Path, metavar="SRC", help="the dataset's root folder")
    p.add_argument("--out", required=True, type=Path, help="new cohort folder")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel of the images (written to slides.csv)")
    p.add_argument("--classes", nargs="+", default=[], metavar="NAME|OLD=NEW",
                   help="labels to keep (NAME) or rename and merge (OLD=NEW); other labels are left out")
    p.add_argument("--labels", type=Path, default=None,
                   help="CSV patient_id,label[,numeric columns such as the CBC] (cellavision, embeddings)")
    p.add_argument("--metadata", type=Path, default=None,
                   help="the dataset's metadata CSV (aml-hehr: patient_id or pseudonym, numeric columns, "
                        "examine_exclude)")
    p.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cohort folder")
    p.set_defaults(func=_import)

    p = sub.add_parser("embed", parents=[common], help="embed every cell into one HDF5 bag per slide (resumable)")
    p.add_argument("--cohort", required=True, type=Path, help="folder with patients.csv and slides.csv")
    p.add_argument("--out", required=True, type=Path, help="folder for the bags (<slide_id>.h5)")
    p.add_argument("--config", type=Path, default=None, help="YAML config (for data.classes)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys (repeatable; several may follow one --set)")
    p.add_argument("--backbone", default="timm/resnet18",
                   help="timm/<model> (default timm/resnet18), dinobloom-s|b|l|g (DinoBloom from Zenodo 10908163, "
                        "224 px; +mean adds the mean patch token), or 'none' with --morphology")
    p.add_argument("--weights", type=Path, default=None, help="local weights (.safetensors or a state dict .pth)")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (nothing is downloaded)")
    p.add_argument("--morphology", action="store_true", help="add handcrafted cytomorphology features")
    p.add_argument("--input-size", type=_positive_int, default=None,
                   help="backbone input side in px (default: the model's own data config)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes (default: CPUs/2, max 4)")
    p.add_argument("--shard", default="0/1", help="I/N: embed slides I, I+N, I+2N, ... (0-based; default 0/1)")
    p.add_argument("--overwrite", action="store_true", help="redo bags that are already finished")
    p.add_argument("--fail-on-bad-image", action="store_true", help="stop at an unreadable crop instead of skipping it")
    p.add_argument("--crop-um", type=float, default=24.0,
                   help="side of the square cut around each detected cell of a scan or field, in µm (default 24)")
    # An embed option, not a config key: how cells are found is part of how bags are made (like
    # --backbone), recorded in each bag's embed_signature; the config is the training's.
    p.add_argument("--detector", default=None, metavar="NAME",
                   help="how the cells of scans and fields are found: stain (default: by their nuclear stain), "
                        "external (the cells listed in <image stem>.geojson or .csv beside each scan or field, "
                        "e.g. a QuPath export), or any detector registered with "
                        "milhema.slides.detectors.register_detector")
    p.add_argument("--stain-normalize", choices=("none", "macenko", "reinhard"), default="none",
                   help="normalise every crop's stain before the backbone and morphology (torchstain; default "
                        "none); each slide is mapped onto the reference with its own stain fitted on 32 of its cells")
    p.add_argument("--stain-reference", type=Path, default=None, metavar="FILE",
                   help="what to normalise to: the stain_reference.json of an earlier embed (e.g. of the training "
                        "cohort) or an image; default: fitted on this cohort and saved as OUT/stain_reference.json")
    p.set_defaults(func=_embed, on_interrupt="run the same command again: finished bags are kept")

    for name, text in (("train", "train one model, early stopping on an inner validation split"),
                       ("cv", "patient-grouped, label-stratified K-fold cross-validation")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--config", type=Path, default=None, help="YAML config (configs/*.yaml); default: built-in")
        p.add_argument("--cohort", required=True, type=Path, help="folder with patients.csv and slides.csv")
        p.add_argument("--bags", type=Path, default=None, help=BAGS_HELP)
        p.add_argument("--out", required=True, type=Path, help="new run folder")
        p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override config keys, e.g. --set train.lr=1e-3 fusion.mode=gated (repeatable)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
        if name == "cv":
            p.add_argument("--folds", type=_positive_int, default=None, help="K (default: cv.folds = 5)")
            p.add_argument("--repeats", type=_positive_int, default=None, help="R (default: cv.repeats = 1)")
            p.add_argument("--resume", action="store_true",
                           help="continue an interrupted run into --out from its finished folds (same config "
                                "and cohort); a complete run is left as it is")
            # What a Ctrl-C says (see main): how to continue without losing finished work.
            p.set_defaults(func=_cv, on_interrupt="run the same command with --resume to continue from the "
                                                 "finished folds")
        else:
            p.set_defaults(func=_train)

    p = sub.add_parser("predict", parents=[common], help="predictions and per-cell scores from a train or cv run")
    p.add_argument("--run", required=True, type=Path, help="run folder of milhema train or cv")
    p.add_argument("--cohort", required=True, type=Path, help="folder with patients.csv and slides.csv")
    p.add_argument("--bags", type=Path, default=None, help=f"{BAGS_HELP}; same backbone as the run")
    p.add_argument("--out", required=True, type=Path, help="new output folder")
    p.add_argument("--ensemble", action="store_true",
                   help="use every fold model for every patient (default: out-of-fold models for patients of the run)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_predict)

    p = sub.add_parser("explain", parents=[common],
                       help="per-cell scores, galleries, heatmaps, QuPath GeoJSON and HTML reports per patient")
    p.add_argument("--run", required=True, type=Path, help="run folder of milhema train or cv")
    p.add_argument("--cohort", required=True, type=Path, help="folder with patients.csv and slides.csv")
    p.add_argument("--bags", type=Path, default=None, help=f"{BAGS_HELP}; same backbone as the run")
    p.add_argument("--out", required=True, type=Path, help="new output folder")
    p.add_argument("--patient", nargs="+", default=None, metavar="ID",
                   help="patients to explain (default: every patient with slides)")
    p.add_argument("--method", choices=("attention", "occlusion"), default="attention",
                   help="attention: the model's cell scores; occlusion: probability drop when a cell is removed")
    p.add_argument("--top-k", type=_positive_int, default=16, help="cells per gallery (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_explain)

    p = sub.add_parser("cells", help="cell-type classifier on the bags' frozen features (train, predict, propose)")
    cells = p.add_subparsers(dest="cells_command", required=True, metavar="STEP")
    q = cells.add_parser("train", parents=[common],
                         help="train and cross-validate (patient-grouped) a cell-type classifier on annotated cells")
    q.add_argument("--cohort", required=True, type=Path, help="folder with patients.csv and slides.csv")
    q.add_argument("--bags", type=Path, default=None, help=BAGS_HELP)
    q.add_argument("--out", required=True, type=Path, help="new run folder")
    q.add_argument("--config", type=Path, default=None, help="YAML config (its cells section); default: built-in")
    q.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set cells.head=linear 'cells.merge={Blast: blast}'")
    q.add_argument("--folds", type=_positive_int, default=None, help="K patient-grouped folds (default: cells.folds = 5)")
    q.add_argument("--labels", type=Path, action="extend", nargs="+", default=[], metavar="CSV",
                   help="labels files (slide_id, cell_id, label; the filled sheet of cells propose): their labels "
                        "add to the bags' annotations or replace them")
    q.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    q.set_defaults(func=_cells_train)
    q = cells.add_parser("predict", parents=[common],
                         help="write cell-type (and anomaly) probabilities into the bags, without re-embedding")
    q.add_argument("--run", required=True, type=Path, help="run folder of milhema cells train")
    q.add_argument("--bags", type=Path, default=None, help="folder of bags (every *.h5 in it, or the cohort's)")
    q.add_argument("--cohort", type=Path, default=None,
                   help="only the bags of this cohort's slides (needed when slides.csv's sources are feature files)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    q.add_argument("--overwrite", action="store_true", help="replace another classifier's predictions in the bags")
    q.set_defaults(func=_cells_predict, on_interrupt="run the same command again: finished bags are kept")
    q = cells.add_parser("propose", parents=[common],
                         help="the unannotated cells whose labels would help the classifier most (active learning): "
                              "an HTML sheet and a CSV to fill")
    q.add_argument("--run", required=True, type=Path, help="run folder of milhema cells train")
    q.add_argument("--bags", type=Path, default=None, help="folder of bags (every *.h5 in it, or the cohort's)")
    q.add_argument("--cohort", type=Path, default=None,
                   help="only the bags of this cohort's slides (needed when slides.csv's sources are feature files)")
    q.add_argument("--budget", required=True, type=_positive_int, help="how many cells to propose")
    q.add_argument("--strategy", choices=("uncertainty", "margin", "coreset", "random"), default="uncertainty",
                   help="uncertainty: largest entropy of the type probabilities (default); margin: smallest gap "
                        "between the two most likely types; coreset: farthest from every annotated cell in feature "
                        "space (greedy k-center); random")
    q.add_argument("--seed", type=int, default=0, help="breaks ties, draws random picks; same seed = same CSV (default 0)")
    q.add_argument("--labels", type=Path, action="extend", nargs="+", default=[], metavar="CSV",
                   help="labels files already filled (earlier proposals): their cells are not proposed again")
    q.add_argument("--out", required=True, type=Path, help="new output folder (to_annotate.csv, to_annotate.html)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.set_defaults(func=_cells_propose)

    p = sub.add_parser("demo", parents=[common], help="the whole pipeline on a simulated cohort, end to end")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="working folder (default demo_out)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="milhema: %(levelname)s: %(message)s")
    warnings.formatwarning = lambda message, category, *a, **k: f"milhema: warning: {message}\n"
    try:
        return int(args.func(args) or 0)
    except MilhemaError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"milhema: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        print(f"milhema: interrupted{f'; {hint}' if hint else ''}", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so on one line unless debugging
        if args.debug:
            raise
        print(f"milhema: internal error: {type(exc).__name__}: {exc} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
