"""``aml-hehr``: the AML_Hehr / SCEMILA release (TCIA "AML-Cytomorphology_MLL_Helmholtz").

Layout: ``<root>/<label>/<patient_id>/*.tif``; the label folder is the diagnosis (``CBFB_MYH11``,
``NPM1``, ``PML_RARA``, ``RUNX1_RUNX1T1``, ``control``), each patient folder holds ~430 single-cell
crops of 144 x 144 px and becomes one slide (a crop folder). An optional metadata CSV
(``--metadata``) keyed by ``patient_id`` or ``pseudonym`` adds its numeric columns
(``pb_myeloblast``, ... differential counts) to patients.csv, and its ``examine_exclude``
flag leaves patients out.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from milhema.importers.common import (
    ImportedCohort,
    ImportedPatient,
    ImportedSlide,
    ImportOptions,
    LabelTable,
    LayoutError,
    check_classes_used,
    count_images,
    read_table,
    relabel,
    safe_id,
)
from milhema.slides.crops import IMAGE_SUFFIXES

LAYOUT = "<root>/<label>/<patient_id>/*.tif"
_METADATA_IDS = ("patient_id", "pseudonym")
# Columns of the metadata that are flags or labels, not patient features.
_NOT_FEATURES = ("bag_label", "examine_exclude", "examine_category_quality")
_TRUE = ("1", "true", "yes", "y", "x")


def import_aml_hehr(src: Path, options: ImportOptions, *, progress: bool = False) -> ImportedCohort:
    """Patients and crop folders of an AML_Hehr tree (see the module docstring)."""
    label_dirs = _label_folders(src)
    left_out: Counter[str] = Counter()
    noted: Counter[str] = Counter()
    check_classes_used(options.classes, [d.name for d in label_dirs])
    metadata = None if options.metadata is None else read_table(
        Path(options.metadata), _METADATA_IDS, label_column="bag_label", skip_columns=_NOT_FEATURES)
    taken: dict[str, str] = {}
    renamed: dict[str, str] = {}
    patients, slides, seen = [], [], set()
    folders = [(label_dir.name, d) for label_dir in label_dirs for d in _visible_dirs(label_dir)]
    for label, folder in tqdm(folders, desc="aml-hehr", unit="patient", disable=None if progress else True):
        if folder.name in seen:
            raise LayoutError(f"patient {folder.name!r} appears under two label folders (one is {label}/): "
                              "which diagnosis is it?")
        seen.add(folder.name)
        keep, cohort_label = relabel(label, options.classes, left_out)
        if not keep or _excluded(metadata, folder.name, left_out):
            continue
        n = count_images(folder, left_out)
        if n == 0:
            left_out["patient(s) without any readable image"] += 1
            continue
        pid = safe_id(folder.name, "patient", taken, renamed)
        values = metadata.values.get(folder.name, {}) if metadata else {}
        if metadata is not None and folder.name not in metadata.rows:
            noted["patient(s) without a metadata row (their values are empty)"] += 1
        elif metadata is not None and metadata.labels.get(folder.name) not in (None, label):
            noted["patient(s) whose metadata bag_label differs from their label folder (the folder is used)"] += 1
        patients.append(ImportedPatient(pid, cohort_label, values))
        slides.append(ImportedSlide(pid, pid, folder, n))
    if metadata is not None:
        unused = len(set(metadata.rows) - seen)
        if unused:
            noted["metadata row(s) of patients without a folder (ignored)"] += unused
    if not patients:
        raise LayoutError(f"{src}: no patient with images left to import ({_said(left_out)})")
    order = sorted(range(len(patients)), key=lambda i: patients[i].patient_id)
    return ImportedCohort("aml-hehr", [patients[i] for i in order], [slides[i] for i in order],
                          metadata.columns if metadata else [], left_out, noted, renamed)


def _label_folders(src: Path) -> list[Path]:
    """The label folders of ``src``, or a one-line refusal naming what was found instead."""
    if not src.is_dir():
        raise LayoutError(f"{src} is not a folder; expected the AML_Hehr tree {LAYOUT}")
    labels = _visible_dirs(src)
    images_here = [p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if images_here or not labels:
        found = f"{len(images_here)} images directly in it" if images_here else "no folders"
        raise LayoutError(f"{src}: expected the AML_Hehr tree {LAYOUT}; found {found}")
    for label in labels:
        inner = _visible_dirs(label)
        if not inner and any(p.suffix.lower() in IMAGE_SUFFIXES for p in label.iterdir()):
            raise LayoutError(f"{src}: expected {LAYOUT}, but {label.name}/ holds images directly: is {src} the "
                              "folder of one label (pass its parent), or a CellaVision export (use cellavision)?")
        deeper = [d for d in inner if _visible_dirs(d)]
        if deeper:
            raise LayoutError(f"{src}: expected {LAYOUT}, but {label.name}/{deeper[0].name}/ holds folders: "
                              "pass the folder whose subfolders are the labels")
    return labels


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _excluded(metadata: LabelTable | None, name: str, left_out: Counter[str]) -> bool:
    if metadata is None or name not in metadata.rows:
        return False
    if metadata.rows[name].get("examine_exclude", "").strip().lower() in _TRUE:
        left_out["patient(s) excluded by examine_exclude"] += 1
        return True
    return False


def _said(left_out: Counter[str]) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in sorted(left_out.items())) or "every folder is empty"
