"""The annotated cells of a cohort's bags: features, cell type and anomaly attributes, per patient.

A cell's annotation is its bag's ``cell_types`` entry: from a crop folder's ``cells.csv`` or its
cell-type subfolder (a class-folder dataset ``<root>/<type>/*.jpg`` is a crop folder with type
subfolders), or from a scan's truth file. The name becomes one of the config's ``cells.types``
as it is, or through ``cells.merge`` (``band -> neutrophil``); any other name is **unknown**:
counted and reported with the closest type, and the cell left out, never guessed. ``""`` (no
annotation) and ``unmatched`` (a detection no annotated cell is near) are not annotations.

Anomaly attributes come from the bags' ``cell_attribute_labels`` (1, 0, -1 = not annotated).

A **labels file** (:func:`read_labels`; the filled sheet of ``milhema cells propose``, columns
``slide_id, cell_id, label``) adds annotations to the bags' or replaces them, cell by cell: a
non-empty ``label`` is the cell's annotation, read as any other (merged, or counted as unknown).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from milhema.bags import Bag, read_bag
from milhema.data.manifest import Cohort, read_table
from milhema.errors import BagError, MilhemaError, closest, did_you_mean
from milhema.settings import CellsSettings
from milhema.train.data import block_columns

NOT_ANNOTATED = ("", "unmatched")   # the bag's marks for a cell without an annotation


@dataclass(frozen=True)
class BagSource:
    """What the bags' features are: the classifier only reads bags made the same way."""

    backbone: str
    weights_sha256: str
    feature_dim: int                        # columns used
    columns: tuple[int, ...] | None = None  # of the bags' features (``cells.feature_blocks``); None = all
    blocks: tuple[str, ...] | None = None   # the feature blocks selected (``cells.feature_blocks``)

    def as_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "weights_sha256": self.weights_sha256, "feature_dim": self.feature_dim,
                "columns": None if self.columns is None else list(self.columns),
                "blocks": None if self.blocks is None else list(self.blocks)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BagSource:
        """The source a run recorded with :meth:`as_dict`."""
        columns, blocks = d.get("columns"), d.get("blocks")
        return cls(str(d["backbone"]), str(d["weights_sha256"]), int(d["feature_dim"]),
                   None if columns is None else tuple(int(c) for c in columns),
                   None if blocks is None else tuple(str(b) for b in blocks))


@dataclass
class AnnotationReport:
    """How the annotations of the bags were read: what became which type, what was left out."""

    slides: int = 0
    cells: int = 0
    annotated: int = 0
    not_annotated: int = 0
    slides_without_types: int = 0
    per_type: Counter[str] = field(default_factory=Counter)
    merged: Counter[str] = field(default_factory=Counter)   # annotated name -> cells, for names of cells.merge
    unknown: Counter[str] = field(default_factory=Counter)  # names neither in cells.types nor cells.merge
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)
    labels: dict[str, Any] | None = None   # what a labels file did (:meth:`CellLabels.describe`), if one was given

    def as_dict(self, cells: CellsSettings) -> dict[str, Any]:
        """The report as metrics.json holds it (unknown names with the type they may be)."""
        hint = [*cells.types, *cells.merge]
        return {**({"labels": self.labels} if self.labels is not None else {}),
            "slides": self.slides, "cells": self.cells, "annotated": self.annotated,
            "not_annotated": self.not_annotated, "slides_without_types": self.slides_without_types,
            "per_type": {t: self.per_type.get(t, 0) for t in cells.types},
            "merged": {name: {"type": cells.merge[name], "cells": n} for name, n in sorted(self.merged.items())},
            "unknown": {name: {"cells": n, "closest": next(iter(closest(name, hint)), None)}
                        for name, n in self.unknown.most_common()},
            "attributes": self.attributes,
        }

    def summary(self, cells: CellsSettings) -> list[str]:
        """Lines for the command line: annotated cells, merges, unknown names (never silently dropped)."""
        lines = [f"{self.annotated} annotated cells of {self.cells} in {self.slides} slides "
                 f"({self.not_annotated} without annotation)"]
        if self.merged:
            lines.append("merged: " + ", ".join(f"{name} -> {cells.merge[name]} ({n})"
                                                 for name, n in sorted(self.merged.items())))
        if self.labels is not None:
            lines.append(labels_summary(self.labels))
        if self.unknown:
            hint = [*cells.types, *cells.merge]
            shown = [f"{name!r} ({n} cells" + "".join(f"; did you mean {c!r}?" for c in closest(name, hint)) + ")"
                     for name, n in self.unknown.most_common(8)]
            more = f" and {len(self.unknown) - 8} more" if len(self.unknown) > 8 else ""
            lines.append(f"left out, not one of cells.types or cells.merge: {', '.join(shown)}{more}")
        return lines


@dataclass
class AnnotatedCells:
    """Annotated cells, in cohort order (patient, slide, cell). Arrays share the first dimension M.

    Attributes:
        features: float32 ``[M, D]`` (the used columns of the bags' features).
        y: int64 ``[M]`` index into ``types``.
        attributes: int8 ``[M, A]`` over ``attribute_names``: 1, 0, -1 (not annotated); A may be 0.
        patients, slides, cell_ids: ``[M]`` object arrays of ids.
    """

    features: np.ndarray
    y: np.ndarray
    attributes: np.ndarray
    patients: np.ndarray
    slides: np.ndarray
    cell_ids: np.ndarray
    types: tuple[str, ...]
    attribute_names: tuple[str, ...]
    source: BagSource
    report: AnnotationReport
    signatures: dict[str, str] = field(default_factory=dict)   # slide id -> slide_signature, every bag read

    def __len__(self) -> int:
        return len(self.y)

    @property
    def patient_ids(self) -> list[str]:
        """The patients with annotated cells, in cohort order."""
        return list(dict.fromkeys(self.patients.tolist()))


@dataclass
class CellLabels:
    """Cell annotations from labels files: ``(slide_id, cell_id) -> label``, each with the row that gave it.

    Attributes:
        labels: ``(slide_id, cell_id) -> (label, where)``; ``where`` names the file and row (``a.csv row 7``).
        files: the files read, in order, with their SHA-256 (recorded with the run).
        added, replaced, confirmed: counted by :func:`gather`: cells without an annotation in their bag
            that a label annotated, cells whose bag annotation the label changed, and that it repeated.
    """

    labels: dict[tuple[str, str], tuple[str, str]]
    files: list[dict[str, str]]
    added: int = 0
    replaced: int = 0
    confirmed: int = 0
    found: set[tuple[str, str]] = field(default_factory=set)   # the labels whose cell a bag holds
    by_slide: dict[str, dict[str, str]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for (slide, cell), (label, _) in self.labels.items():
            self.by_slide.setdefault(slide, {})[cell] = label

    def of_slide(self, slide_id: str) -> dict[str, str]:
        """``cell_id -> label`` for the cells of one slide."""
        return self.by_slide.get(slide_id, {})

    def describe(self) -> dict[str, Any]:
        """What the labels did, for metrics.json."""
        return {"files": self.files, "labelled_cells": len(self.labels), "added": self.added,
                "replaced": self.replaced, "confirmed": self.confirmed}


def labels_summary(labels: Mapping[str, Any]) -> str:
    """One line for the command line: what the labels files (:meth:`CellLabels.describe`) added and replaced."""
    names = ", ".join(Path(f["path"]).name for f in labels["files"])
    return (f"labels from {names}: {labels['labelled_cells']} cells ({labels['added']} added to cells without "
            f"annotation, {labels['replaced']} replacing another annotation, {labels['confirmed']} confirming one)")


LABEL_COLUMNS = ("slide_id", "cell_id", "label")


def read_labels(paths: Sequence[Path]) -> CellLabels:
    """The non-empty labels of the files ``paths`` (CSV with at least ``slide_id, cell_id, label``;
    ``,`` or ``;`` separated). Rows with an empty ``label`` are cells left unlabelled.

    Raises:
        MilhemaError: an unreadable file, a missing column, or one cell given two different labels
            (naming both rows).
    """
    labels: dict[tuple[str, str], tuple[str, str]] = {}
    files = []
    for path in paths:
        path = Path(path)
        _, rows, _ = read_table(path, LABEL_COLUMNS)
        files.append({"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        for number, row in rows:
            label = row["label"]
            if label in NOT_ANNOTATED:
                continue
            where, key = f"{path.name} row {number}", (row["slide_id"], row["cell_id"])
            if not key[0] or not key[1]:
                raise MilhemaError(f"{where}: slide_id and cell_id are both needed to name the cell labelled {label!r}")
            earlier = labels.get(key)
            if earlier is not None and earlier[0] != label:
                raise MilhemaError(f"{where}: cell {key[1]!r} of slide {key[0]} is labelled {label!r} here but "
                                   f"{earlier[0]!r} in {earlier[1]}; keep one")
            labels.setdefault(key, (label, where))
    return CellLabels(labels, files)


def slide_signature(bag: Bag) -> str:
    """What identifies a slide's data beyond its id: SHA-256 of its id, cell ids and features."""
    digest = hashlib.sha256(bag.slide_id.encode())
    digest.update("\n".join(map(str, bag.cell_ids)).encode())
    digest.update(np.ascontiguousarray(bag.features).tobytes())
    return digest.hexdigest()[:32]


def bag_source(attrs: Mapping[str, Any], feature_dim: int, feature_blocks: Sequence[str] | None,
               slide_id: str) -> BagSource:
    """The :class:`BagSource` of a bag with root attributes ``attrs`` and ``feature_dim`` feature columns
    (``feature_blocks`` selects columns, as ``data.feature_blocks`` does)."""
    columns = block_columns(attrs, feature_blocks, f"slide {slide_id}")
    return BagSource(str(attrs.get("backbone", "unknown")), str(attrs.get("weights_sha256", "none")),
                     len(columns) if columns is not None else feature_dim, columns,
                     None if feature_blocks is None else tuple(feature_blocks))


def gather(cohort: Cohort, bags: Path | None, cells: CellsSettings,
           patient_ids: Sequence[str] | None = None, labels: CellLabels | None = None) -> AnnotatedCells:
    """The annotated cells of every slide of ``patient_ids`` (default: every patient), as :class:`AnnotatedCells`;
    ``labels`` add annotations to the bags' or replace them (and are counted in it).

    Raises:
        BagError: a slide without its bag, or bags made with different backbones.
        MilhemaError: no annotated cell of a known type, ``cells.attributes`` names an attribute
            no bag carries, or a label names a cell that is not in the bags (naming its row).
    """
    report = AnnotationReport()
    read: set[str] = set()
    parts: list[tuple[Bag, np.ndarray, np.ndarray, str]] = []
    signatures: dict[str, str] = {}
    source: BagSource | None = None
    for pid in cohort.patient_ids if patient_ids is None else patient_ids:
        for slide in cohort.slides_of(pid):
            path = slide.bag_path(bags)
            if not path.is_file():
                raise BagError(f"slide {slide.slide_id}: no bag file {path} (run milhema embed first)")
            bag = read_bag(path, thumbnails=False)
            here = bag_source(bag.attrs, bag.feature_dim, cells.feature_blocks, bag.slide_id)
            source = source or here
            if here != source:
                raise BagError(f"slide {slide.slide_id}: bag made with {here.backbone} ({here.feature_dim} features) "
                               f"but earlier slides with {source.backbone} ({source.feature_dim}); re-embed one of them")
            report.slides += 1
            report.cells += bag.n_cells
            signatures[slide.slide_id] = slide_signature(bag)
            read.add(slide.slide_id)
            rows, y = _typed_rows(bag, cells, report, labels)
            if len(rows):
                parts.append((bag, rows, y, pid))
    if source is None:
        raise MilhemaError(f"no slides in the cohort to read annotations from ({cohort.root})")
    if labels is not None:
        _check_labels_found(labels, read, {s.slide_id for s in cohort.slides}, cohort)
        report.labels = labels.describe()
    if not parts:
        raise MilhemaError(f"no annotated cell of a type in cells.types among the {report.cells} cells of the bags "
                           f"in {bags}: annotate cells (cells.csv, cell-type subfolders) or map their names with "
                           f"cells.merge{_unknown_hint(report)}")
    names = _attribute_names(parts, cells)
    found = _assemble(parts, names, source, cells, report)
    found.signatures = signatures
    return found


def _typed_rows(bag: Bag, cells: CellsSettings, report: AnnotationReport,
                labels: CellLabels | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``bag`` whose annotation (its own, or a label's) is a known type, and that type's index;
    counts the others."""
    given = {} if labels is None else labels.of_slide(bag.slide_id)
    if bag.cell_types is None:
        report.slides_without_types += 1
        if not given:
            report.not_annotated += bag.n_cells
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
    names = [""] * bag.n_cells if bag.cell_types is None else [str(t).strip() for t in bag.cell_types]
    if given:
        names = _apply_labels(bag, names, given, labels)
    rows, y = [], []
    for i, name in enumerate(names):
        if name in NOT_ANNOTATED:
            report.not_annotated += 1
            continue
        found = cells.type_of(name)
        if found is None:
            report.unknown[name] += 1
            continue
        if name not in cells.types:
            report.merged[name] += 1
        report.per_type[found] += 1
        rows.append(i)
        y.append(cells.types.index(found))
    report.annotated += len(rows)
    return np.array(rows, np.int64), np.array(y, np.int64)


def _apply_labels(bag: Bag, names: list[str], given: dict[str, str], labels: CellLabels | None) -> list[str]:
    """``names`` (the bag's annotations) with the labels of this slide's cells put in, counted in ``labels``."""
    assert labels is not None
    names = list(names)
    for i, cell in enumerate(bag.cell_ids):
        label = given.get(str(cell))
        if label is None:
            continue
        labels.found.add((bag.slide_id, str(cell)))
        if names[i] in NOT_ANNOTATED:
            labels.added += 1
        elif names[i] == label:
            labels.confirmed += 1
        else:
            labels.replaced += 1
        names[i] = label
    return names


def _check_labels_found(labels: CellLabels, read: set[str], cohort_slides: set[str], cohort: Cohort) -> None:
    """Refuse a label for a slide of no bag, or for a cell its slide's bag does not hold (naming the row)."""
    for (slide, cell), (label, where) in labels.labels.items():
        if slide not in cohort_slides:
            raise MilhemaError(f"{where}: slide {slide!r} is not in the cohort ({cohort.root / 'slides.csv'})"
                               f"{did_you_mean(slide, sorted(cohort_slides))}")
        if slide in read and (slide, cell) not in labels.found:   # slides not read: patients left out by the call
            raise MilhemaError(f"{where}: slide {slide} has no cell {cell!r} in its bag (labelled {label!r}); "
                               "a label must name a cell of these bags")


def _unknown_hint(report: AnnotationReport) -> str:
    if not report.unknown:
        return ""
    names = ", ".join(repr(n) for n, _ in report.unknown.most_common(5))
    return f" (the annotated names found: {names})"


def _attribute_names(parts: list[tuple[Bag, np.ndarray, np.ndarray, str]], cells: CellsSettings) -> tuple[str, ...]:
    carried = list(dict.fromkeys(name for bag, _, _, _ in parts for name in bag.attribute_label_names))
    if cells.attributes is None:
        return tuple(carried)
    missing = [a for a in cells.attributes if a not in carried]
    if missing:
        raise MilhemaError(f"cells.attributes names {missing[0]!r}, which no annotated bag carries"
                           f"{did_you_mean(missing[0], carried)}; the bags carry "
                           f"{', '.join(carried) or 'no attribute (no 0/1 column in cells.csv)'}")
    return tuple(cells.attributes)


def _assemble(parts: list[tuple[Bag, np.ndarray, np.ndarray, str]], names: tuple[str, ...], source: BagSource,
              cells: CellsSettings, report: AnnotationReport) -> AnnotatedCells:
    features, attributes, patients, slides, cell_ids = [], [], [], [], []
    for bag, rows, _, pid in parts:
        x = bag.features[rows]
        features.append((x if source.columns is None else x[:, list(source.columns)]).astype(np.float32))
        block = np.full((len(rows), len(names)), -1, np.int8)
        for j, name in enumerate(names):
            if bag.attribute_labels is not None and name in bag.attribute_label_names:
                block[:, j] = bag.attribute_labels[rows, bag.attribute_label_names.index(name)]
        attributes.append(block)
        patients += [pid] * len(rows)
        slides += [bag.slide_id] * len(rows)
        cell_ids += [str(c) for c in bag.cell_ids[rows]]
    a = np.concatenate(attributes)
    report.attributes = {name: {"positive": int((a[:, j] == 1).sum()), "negative": int((a[:, j] == 0).sum())}
                         for j, name in enumerate(names)}
    return AnnotatedCells(np.concatenate(features), np.concatenate([y for _, _, y, _ in parts]), a,
                          np.array(patients, dtype=object), np.array(slides, dtype=object),
                          np.array(cell_ids, dtype=object), tuple(cells.types), names, source, report)
