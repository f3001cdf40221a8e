"""Everything known about a patient's cells, in the order of its training bag.

:class:`~milhema.train.data.PatientBag` concatenates the patient's slides in slides.csv order;
this module reads the same bag files again with thumbnails, boxes and cell types so that cell
i of a score vector maps to ``(slide_ids[i], cell_ids[i])`` and its image.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np

from milhema.bags import read_bag
from milhema.data.manifest import Cohort
from milhema.errors import BagError
from milhema.train.data import PatientBag


@dataclass
class PatientCells:
    """Per-cell arrays of one patient (N = all cells of all its slides).

    Attributes:
        slide_ids: ``[N]`` slide of each cell.
        cell_ids: ``[N]`` cell id within its slide.
        index_in_slide: ``[N]`` row of the cell in its slide's bag file.
        coords: ``[N, 2]`` level-0 px centres, or px of the cell's field (NaN for crop folders).
        bboxes: ``[N, 4]`` px boxes (x0, y0, x1, y1) in the same frame, NaN where unknown.
        thumbnails: ``[N, S, S, 3]`` uint8 or None when no slide has thumbnails.
        cell_types: ``[N]`` str ("" where unknown) or None when no slide has them.
        diagnostic: ``[N]`` bool or None unless every slide carries it.
        features: ``[N, D]`` features as the model sees them (before standardisation).
        field: ``[N]`` int, index of the cell's field in ``field_names[slide_ids[i]]``; -1 outside fields folders.
        field_names: slide id -> the field image names of a fields folder (only slides that have them).
    """

    slide_ids: np.ndarray
    cell_ids: np.ndarray
    index_in_slide: np.ndarray
    coords: np.ndarray
    bboxes: np.ndarray
    thumbnails: np.ndarray | None
    cell_types: np.ndarray | None
    diagnostic: np.ndarray | None
    features: np.ndarray
    field: np.ndarray = dataclass_field(default_factory=lambda: np.zeros(0, np.int32))
    field_names: dict[str, tuple[str, ...]] = dataclass_field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.cell_ids)


def patient_cells(cohort: Cohort, bags: Path | None, bag: PatientBag) -> PatientCells:
    """Read the bag files of ``bag``'s slides and check they line up with it cell by cell."""
    slides, cells, index, boxes, thumbs, types, fields = [], [], [], [], [], [], []
    field_names: dict[str, tuple[str, ...]] = {}
    slide_of = {s.slide_id: s for s in cohort.slides_of(bag.patient_id)}
    for slide_id in bag.slide_ids:
        b = read_bag(slide_of[slide_id].bag_path(bags), thumbnails=True)
        n = b.n_cells
        slides.append(np.full(n, slide_id, dtype=object))
        cells.append(np.asarray(b.cell_ids, dtype=object))
        index.append(np.arange(n))
        boxes.append(b.bboxes.astype(np.float64) if b.bboxes is not None else np.full((n, 4), np.nan))
        thumbs.append(b.thumbnails)
        types.append(b.cell_types)
        fields.append(b.field if b.field is not None else np.full(n, -1, np.int32))
        if b.field is not None:
            field_names[slide_id] = b.field_names
    if not slides:
        empty = np.zeros(0, dtype=object)
        return PatientCells(empty, empty, np.zeros(0, int), np.zeros((0, 2)), np.zeros((0, 4)), None, None, None,
                            bag.features)
    cell_ids = np.concatenate(cells)
    if len(cell_ids) != bag.n_cells or not np.array_equal(cell_ids, np.asarray(bag.cell_ids, dtype=object)):
        raise BagError(f"patient {bag.patient_id}: the bag files changed while explaining (cell ids differ)")
    thumbnails = None
    if any(t is not None for t in thumbs):
        size = next(t for t in thumbs if t is not None).shape[1:]
        thumbnails = np.concatenate([t if t is not None and t.shape[1:] == size
                                     else np.full((len(s), *size), 200, np.uint8) for t, s in zip(thumbs, slides,
                                                                                                   strict=True)])
    cell_types = None
    if any(t is not None for t in types):
        cell_types = np.concatenate([np.asarray(t, dtype=object) if t is not None else np.full(len(s), "", object)
                                     for t, s in zip(types, slides, strict=True)])
    return PatientCells(np.concatenate(slides), cell_ids, np.concatenate(index), bag.coords.astype(np.float64),
                        np.concatenate(boxes), thumbnails, cell_types, bag.diagnostic, bag.features,
                        np.concatenate(fields).astype(np.int32), field_names)
