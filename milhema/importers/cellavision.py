"""``cellavision``: a blood-smear analyser's export, one folder per patient.

Layout: ``<root>/<patient>/<cell type>/*.jpg`` (one slide per patient), or with a slide level
``<root>/<patient>/<slide>/<cell type>/*.jpg``. The cell-type folder names each cell's
``cell_type`` (``milhema embed`` walks them); the slide folder is the crop folder of the
manifest. Labels, and any numeric column such as the CBC, come from ``--labels CSV``
(``patient_id,label[,wbc,hb,...]``); without it the cohort has no labels (enough for ``predict``).
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
    LayoutError,
    check_classes_used,
    count_images,
    read_table,
    relabel,
    safe_id,
)
from milhema.slides.crops import IMAGE_SUFFIXES

LAYOUT = "<root>/<patient>/<cell type>/*.jpg or <root>/<patient>/<slide>/<cell type>/*.jpg"


def import_cellavision(src: Path, options: ImportOptions, *, progress: bool = False) -> ImportedCohort:
    """Patients, slides and cell-type folders of a CellaVision-style export (see the module docstring)."""
    patient_dirs = _dirs(src) if src.is_dir() else []
    if not patient_dirs:
        raise LayoutError(f"{src}: expected a CellaVision export {LAYOUT}; found no patient folders")
    table = None if options.labels is None else read_table(Path(options.labels), ("patient_id",))
    if table is not None:
        check_classes_used(options.classes, [v for v in table.labels.values() if v])
    left_out: Counter[str] = Counter()
    noted: Counter[str] = Counter()
    taken_patients: dict[str, str] = {}
    taken_slides: dict[str, str] = {}
    renamed: dict[str, str] = {}
    patients, slides = [], []
    for folder in tqdm(patient_dirs, desc="cellavision", unit="patient", disable=None if progress else True):
        label = table.labels.get(folder.name) if table else None
        if table is not None and folder.name not in table.rows:
            noted["patient(s) without a row in --labels (no label)"] += 1
        keep, label = relabel(label, options.classes, left_out)
        if not keep:
            continue
        found = [(slide, n) for slide in _slide_folders(src, folder)
                 if (n := sum(count_images(t, left_out) for t in _dirs(slide))) > 0]
        if not found:
            left_out["patient(s) without any readable image"] += 1
            continue
        pid = safe_id(folder.name, "patient", taken_patients, renamed)
        patients.append(ImportedPatient(pid, label, table.values.get(folder.name, {}) if table else {}))
        for slide, n in found:
            name = folder.name if slide == folder else f"{folder.name}_{slide.name}"
            slides.append(ImportedSlide(safe_id(name, "slide", taken_slides, renamed), pid, slide, n))
    if table is not None:
        unused = len(set(table.rows) - {d.name for d in patient_dirs})
        if unused:
            noted["--labels row(s) of patients without a folder (ignored)"] += unused
    if not patients:
        raise LayoutError(f"{src}: no patient with images left to import "
                          f"({'; '.join(f'{n} {r}' for r, n in sorted(left_out.items())) or 'no images'})")
    patients.sort(key=lambda p: p.patient_id)
    slides.sort(key=lambda s: (s.patient_id, s.slide_id))
    return ImportedCohort("cellavision", patients, slides, table.columns if table else [], left_out, noted, renamed)


def _dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _slide_folders(src: Path, patient: Path) -> list[Path]:
    """The crop folders of one patient: the patient folder itself when its subfolders hold the images
    (cell types), else each subfolder whose own subfolders do (a slide level)."""
    subfolders = _dirs(patient)
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in patient.iterdir()):
        raise LayoutError(f"{src}: expected {LAYOUT}, but {patient.name}/ holds images directly, not in "
                          "cell-type folders: is it a crop folder of its own (write slides.csv by hand, or use "
                          "aml-hehr for <label>/<patient>/*.tif)?")
    typed = [d for d in subfolders if any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir())]
    nested = [d for d in subfolders if _dirs(d)]
    if typed and nested:
        raise LayoutError(f"{src}: {patient.name}/ mixes cell-type folders ({typed[0].name}/) and slide folders "
                          f"({nested[0].name}/); expected {LAYOUT}")
    return nested if nested else [patient]
