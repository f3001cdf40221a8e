"""What every importer shares: options, the imported cohort, label tables, class maps, writing.

An importer reads a public layout and returns an :class:`ImportedCohort`; :func:`write_cohort`
turns it into a manifest folder (``patients.csv``, ``slides.csv``, a starting ``config.yaml``
and ``import.json``) that references the images or feature files where they are. Nothing is
copied or modified, everything is sorted, and nothing holds a time stamp, so the same import
gives byte-identical files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image, UnidentifiedImageError

from milhema.data.manifest import PATIENTS_FILE, SLIDES_FILE
from milhema.errors import MilhemaError, did_you_mean
from milhema.io import atomic_folder, write_csv, write_text
from milhema.slides.crops import IMAGE_SUFFIXES

IMPORT_FILE = "import.json"
CONFIG_FILE = "config.yaml"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class LayoutError(MilhemaError):
    """The source folder does not have the layout the importer reads, or its tables do not fit it."""


@dataclass(frozen=True)
class ImportOptions:
    """What the user says about a layout beyond its files.

    Attributes:
        mpp: µm per pixel of the images, written to slides.csv (needed by ``embed --morphology``).
        classes: source label -> cohort label; labels not in it are left out. None keeps every label.
        labels: a CSV ``patient_id,label[,numeric columns...]`` for layouts without labels.
        metadata: a layout's own metadata table (``aml-hehr``).
    """

    mpp: float | None = None
    classes: Mapping[str, str] | None = None
    labels: Path | None = None
    metadata: Path | None = None


@dataclass
class ImportedPatient:
    """One patient: its id (safe as a file name), label (after the class map) and numeric columns (as written)."""

    patient_id: str
    label: str | None
    values: dict[str, str] = field(default_factory=dict)


@dataclass
class ImportedSlide:
    """One slide: a crop folder or a feature file, referenced in place, with its number of cells."""

    slide_id: str
    patient_id: str
    source: Path
    n_cells: int


@dataclass
class ImportedCohort:
    """An importer's result, before it is written.

    ``columns`` are the numeric patients.csv columns beyond ``patient_id, label`` (patient
    features a config can list); ``left_out`` counts what was not imported, by reason, and
    ``noted`` what was imported with a caveat; ``renamed`` maps ids that were not safe as file
    names to the ids written.
    """

    layout: str
    patients: list[ImportedPatient]
    slides: list[ImportedSlide]
    columns: list[str] = field(default_factory=list)
    left_out: Counter[str] = field(default_factory=Counter)
    noted: Counter[str] = field(default_factory=Counter)
    renamed: dict[str, str] = field(default_factory=dict)
    embedded: bool = False   # the slides are feature files: no `milhema embed` step

    @property
    def classes(self) -> list[str]:
        return sorted({p.label for p in self.patients if p.label is not None})

    def summary(self) -> list[str]:
        """What will be written, as lines for the terminal."""
        per_class = Counter(p.label or "(no label)" for p in self.patients)
        cells: dict[str, int] = Counter()
        for slide in self.slides:
            cells[slide.patient_id] += slide.n_cells
        counts = [cells[p.patient_id] for p in self.patients]
        unit = "feature rows" if self.embedded else "cells"
        lines = [f"{self.layout}: {len(self.patients)} patients, {len(self.slides)} slides; "
                 + ", ".join(f"{name} {n}" for name, n in sorted(per_class.items()))]
        if counts:
            lines.append(f"{unit} per patient: min {min(counts)}, median {statistics.median(counts):g}, "
                         f"max {max(counts)} ({sum(counts):,} in all)")
        if self.columns:
            shown = ", ".join(self.columns[:8]) + (f", ... ({len(self.columns)} in all)" if len(self.columns) > 8 else "")
            lines.append(f"numeric patient columns (usable as data.patient_features): {shown}")
        if self.left_out:
            lines.append("left out: " + "; ".join(f"{n} {reason}" for reason, n in sorted(self.left_out.items())))
        if self.noted:
            lines.append("note: " + "; ".join(f"{n} {reason}" for reason, n in sorted(self.noted.items())))
        if self.renamed:
            lines.append(f"{len(self.renamed)} id(s) were not safe as file names and were renamed (see {IMPORT_FILE})")
        return lines


def safe_id(name: str, what: str, taken: dict[str, str], renamed: dict[str, str]) -> str:
    """``name`` as an id safe in file names (``_`` for other characters), unique among ``taken``.

    Raises:
        LayoutError: two names become the same id.
    """
    safe = name if _SAFE_ID.match(name) and ".." not in name else _UNSAFE.sub("_", name).strip("._-")[:200] or "x"
    if safe in taken and taken[safe] != name:
        raise LayoutError(f"{what} {taken[safe]!r} and {name!r} both become {safe!r}: rename one of the folders")
    taken[safe] = name
    if safe != name:
        renamed[name] = safe
    return safe


def parse_class_map(items: Sequence[str]) -> dict[str, str] | None:
    """``--classes`` values: ``NAME`` keeps a label, ``OLD=NEW`` renames it (several OLD may share a NEW).

    Raises:
        LayoutError: an empty name.
    """
    if not items:
        return None
    mapping: dict[str, str] = {}
    for item in items:
        old, sep, new = (part.strip() for part in item.partition("="))
        if not old or (sep and not new):
            raise LayoutError(f"--classes {item!r}: write NAME to keep a label or OLD=NEW to rename it")
        mapping[old] = new if sep else old
    return mapping


def relabel(label: str | None, classes: Mapping[str, str] | None, left_out: Counter[str]) -> tuple[bool, str | None]:
    """``(keep, label)`` after ``--classes``: patients whose label it does not list are left out and counted."""
    if classes is None or label is None:
        return True, label
    if label not in classes:
        left_out[f"patient(s) with a label --classes does not list ({label})"] += 1
        return False, None
    return True, classes[label]


def check_classes_used(classes: Mapping[str, str] | None, found: Iterable[str]) -> None:
    """Refuse a ``--classes`` name that matches no label of the source (a typo would empty a class)."""
    if classes is None:
        return
    found = sorted(set(found))
    for name in classes:
        if name not in found:
            raise LayoutError(f"--classes names {name!r}, which is not a label of this source "
                              f"({', '.join(found)}){did_you_mean(name, found)}")


@dataclass
class LabelTable:
    """A CSV of per-patient values: label (optional column) and numeric columns, keyed by patient id."""

    labels: dict[str, str | None]
    values: dict[str, dict[str, str]]
    columns: list[str]
    rows: dict[str, dict[str, str]]   # every column as read, for layout-specific ones (exclusion flags)


def read_table(path: Path, id_columns: Sequence[str], *, label_column: str | None = "label",
               skip_columns: Sequence[str] = ()) -> LabelTable:
    """Read a per-patient CSV: the first of ``id_columns`` present names the patient.

    Numeric columns are those whose non-empty cells all parse as numbers (a decimal comma is
    read as a point); other columns, and ``skip_columns``, are kept out of :attr:`LabelTable.columns`.

    Raises:
        LayoutError: unreadable file, no id column, an empty or repeated id.
    """
    if not path.is_file():
        raise LayoutError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LayoutError(f"{path.name}: not UTF-8 text (byte {exc.start}); save it as CSV UTF-8") from exc
    lines = text.splitlines()
    if not lines:
        raise LayoutError(f"{path.name}: file is empty (expected a header row)")
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    header = [h.strip() for h in reader.fieldnames or []]
    id_column = next((c for c in id_columns if c in header), None)
    if id_column is None:
        raise LayoutError(f"{path.name}: no patient id column; expected one of {', '.join(id_columns)}, "
                          f"the header has {', '.join(header[:10])}")
    rows: dict[str, dict[str, str]] = {}
    for number, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        pid = row.get(id_column, "")
        if not pid:
            if any(row.values()):
                raise LayoutError(f"{path.name} row {number}: {id_column} is empty")
            continue
        if pid in rows:
            raise LayoutError(f"{path.name} row {number}: {id_column} {pid!r} appears twice")
        rows[pid] = row
    skipped = {id_column, *(c for c in (label_column,) if c), *skip_columns}
    columns = [c for c in header if c not in skipped and _numeric(r.get(c, "") for r in rows.values())]
    has_label = label_column is not None and label_column in header
    return LabelTable(
        labels={pid: (row.get(label_column or "", "") or None) if has_label else None for pid, row in rows.items()},
        values={pid: {c: _number_text(row.get(c, "")) for c in columns} for pid, row in rows.items()},
        columns=columns, rows=rows)


def _numeric(values: Iterable[str]) -> bool:
    seen = False
    for value in values:
        if value:
            seen = True
            if _number_text(value) == "":
                return False
    return seen


def _number_text(value: str) -> str:
    """A cell as a number's text (decimal comma read as a point), or "" when it is empty or not a number."""
    try:
        number = float(value.replace(",", "."))
    except ValueError:
        return ""
    return value.replace(",", ".") if math.isfinite(number) else ""


def write_cohort(imported: ImportedCohort, out: Path, options: ImportOptions, source: Path, *,
                 overwrite: bool = False) -> Path:
    """Write the manifest folder ``out`` (built aside and renamed when complete); returns ``out``."""
    out = Path(out)
    final = out.resolve()
    with atomic_folder(out, overwrite=overwrite, what="cohort folder") as tmp:
        write_csv(tmp / PATIENTS_FILE, ["patient_id", "label", *imported.columns],
                  [[p.patient_id, p.label or "", *(p.values.get(c, "") for c in imported.columns)]
                   for p in imported.patients])
        mpp = [] if options.mpp is None else [f"{options.mpp:g}"]
        write_csv(tmp / SLIDES_FILE, ["slide_id", "patient_id", "source", *(["mpp"] if mpp else [])],
                  [[s.slide_id, s.patient_id, _reference(s.source, final), *mpp] for s in imported.slides])
        write_text(tmp / CONFIG_FILE, _config_text(imported))
        record = {
            "format": "milhema-import", "layout": imported.layout, "source": str(Path(source).resolve()),
            "options": {"mpp": options.mpp, "classes": dict(options.classes) if options.classes else None,
                        "labels": None if options.labels is None else str(Path(options.labels).resolve()),
                        "metadata": None if options.metadata is None else str(Path(options.metadata).resolve())},
            "patients": len(imported.patients), "slides": len(imported.slides),
            "cells": sum(s.n_cells for s in imported.slides), "left_out": dict(sorted(imported.left_out.items())),
            "noted": dict(sorted(imported.noted.items())),
            "renamed": dict(sorted(imported.renamed.items())),
        }
        write_text(tmp / IMPORT_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def _reference(path: Path, cohort: Path) -> str:
    """``path`` relative to the cohort folder (slides.csv resolves it from there), else absolute."""
    try:
        return Path(os.path.relpath(path.resolve(), cohort)).as_posix()
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def _config_text(imported: ImportedCohort) -> str:
    """A starting config: this cohort's classes and numeric patient columns."""
    data: dict[str, object] = {"classes": imported.classes or ["<set the classes>"],
                               "patient_features": list(imported.columns)}
    head = (f"# Written by `milhema import {imported.layout}`: the classes and patient features of this cohort.\n"
            "# Pass it to embed / train / cv with --config; other keys keep their defaults (docs and milhema/config.py).\n")
    if not imported.columns:
        head += "# No numeric patient column: the models read the cells alone (no CBC fusion, no CBC-only baseline).\n"
    return head + yaml.safe_dump({"data": data}, sort_keys=False)


def count_images(folder: Path, left_out: Counter[str], *, check: bool = True) -> int:
    """Image files directly in ``folder`` (extensions in any case); the others are counted in ``left_out``.

    With ``check`` each image's header is read, so a damaged file is counted now rather than
    found at embedding (which skips it too). Hidden files (``.DS_Store``) are ignored.
    """
    n = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            left_out["file(s) that are not images"] += 1
            continue
        if check:
            try:
                with Image.open(path) as image:
                    image.size  # noqa: B018  (reading the header is the check)
            except (OSError, UnidentifiedImageError, ValueError):
                left_out["unreadable image(s) (embed skips them too)"] += 1
                continue
        n += 1
    return n
