"""``embeddings``: feature files published by other projects, used as bags without re-embedding.

Layout: ``<root>/**/<name>.h5`` — DinoBloom's per-patient embeddings (``features [N, D]`` only),
CLAM / TRIDENT files (``features`` + ``coords``) or milhema bags. Each file is one slide; its
name is the patient unless ``--labels`` has a ``slide_id`` column mapping file names to patients
(several files per patient). Labels and numeric columns come from ``--labels CSV``. PyTorch
``.pt`` files are not accepted: they are pickles, and milhema never unpickles a user's file.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from milhema.bags import read_bag_attrs
from milhema.errors import BagError
from milhema.importers.common import (
    ImportedCohort,
    ImportedPatient,
    ImportedSlide,
    ImportOptions,
    LabelTable,
    LayoutError,
    check_classes_used,
    read_table,
    relabel,
    safe_id,
)

SUFFIXES = (".h5", ".hdf5")
LAYOUT = "<root>/<patient>.h5 (features [N, D], optionally coords [N, 2])"


def import_embeddings(src: Path, options: ImportOptions, *, progress: bool = False) -> ImportedCohort:
    """Feature files under ``src`` as slides whose sources are the files themselves (see the module docstring)."""
    files, pickles = _feature_files(src)
    if not files:
        extra = f" ({pickles} .pt/.pth files: they are pickles, which milhema never loads; save them as HDF5)" \
            if pickles else ""
        raise LayoutError(f"{src}: expected feature files {LAYOUT}; found none{extra}")
    table, patient_of = (None, {}) if options.labels is None else _read_labels(Path(options.labels))
    if table is not None:
        check_classes_used(options.classes, [v for v in table.labels.values() if v])
    left_out: Counter[str] = Counter({"PyTorch .pt/.pth file(s) (pickles are never loaded)": pickles} if pickles else {})
    noted: Counter[str] = Counter()
    taken: dict[str, str] = {}
    taken_slides: dict[str, str] = {}
    renamed: dict[str, str] = {}
    patients: dict[str, ImportedPatient] = {}
    slides: list[ImportedSlide] = []
    width: tuple[int, str] | None = None
    for path in files:
        name = patient_of.get(path.stem, path.stem)
        try:
            attrs = read_bag_attrs(path)
        except BagError as exc:
            left_out["unreadable feature file(s)"] += 1
            noted[f"{path.name}: {exc}"] += 1
            continue
        dim = int(attrs["feature_dim"])
        if width is not None and dim != width[0]:
            raise LayoutError(f"{path.name} has {dim} features per cell but {width[1]} has {width[0]}: "
                              "one cohort needs one embedding")
        width = width or (dim, path.name)
        if table is not None and name not in table.rows:
            noted["file(s) without a row in --labels (no label)"] += 1
        keep, label = relabel(table.labels.get(name) if table else None, options.classes, left_out)
        if not keep:
            continue
        pid = safe_id(name, "patient", taken, renamed)
        patients.setdefault(pid, ImportedPatient(pid, label, table.values.get(name, {}) if table else {}))
        slides.append(ImportedSlide(safe_id(path.stem, "slide", taken_slides, renamed), pid, path,
                                    int(attrs["n_cells"])))
    if not patients:
        raise LayoutError(f"{src}: no feature file left to import "
                          f"({'; '.join(f'{n} {r}' for r, n in sorted(left_out.items()))})")
    return ImportedCohort("embeddings", sorted(patients.values(), key=lambda p: p.patient_id),
                          sorted(slides, key=lambda s: (s.patient_id, s.slide_id)),
                          table.columns if table else [], left_out, noted, renamed, embedded=True)


def _feature_files(src: Path) -> tuple[list[Path], int]:
    if not src.is_dir():
        raise LayoutError(f"{src} is not a folder; expected {LAYOUT}")
    visible = [p for p in src.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    files = sorted((p for p in visible if p.suffix.lower() in SUFFIXES), key=lambda p: p.relative_to(src).as_posix())
    stems = Counter(p.stem for p in files)
    twice = [s for s, n in stems.items() if n > 1]
    if twice:
        raise LayoutError(f"{src}: two files are named {twice[0]!r} in different folders; a file name is a slide id")
    return files, sum(1 for p in visible if p.suffix.lower() in (".pt", ".pth"))


def _read_labels(path: Path) -> tuple[LabelTable, dict[str, str]]:
    """The patients' labels and values, and file stem -> patient when the table has a ``slide_id``
    column (one row per file; a patient's rows must agree on label and values)."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), [])
    if "slide_id" not in [h.strip() for h in header]:
        return read_table(path, ("patient_id",)), {}
    by_slide = read_table(path, ("slide_id",), skip_columns=("patient_id",))
    patient_of = {sid: row.get("patient_id", "") or sid for sid, row in by_slide.rows.items()}
    labels: dict[str, str | None] = {}
    values: dict[str, dict[str, str]] = {}
    rows: dict[str, dict[str, str]] = {}
    for sid, pid in patient_of.items():
        here = (by_slide.labels[sid], by_slide.values[sid])
        if pid in labels and (labels[pid], values[pid]) != here:
            raise LayoutError(f"{path.name}: the rows of patient {pid!r} disagree on its label or values "
                              f"(slide {sid!r}); a patient has one label")
        labels[pid], values[pid], rows[pid] = here[0], here[1], by_slide.rows[sid]
    return LabelTable(labels, values, by_slide.columns, rows), patient_of
