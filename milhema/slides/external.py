"""External detections: cell positions a lab already has, read instead of detecting.

With ``milhema embed --detector external`` the cells of an image (a scan, or one photographed
field) are the ones listed in a file beside it, named after the image without its last suffix:

- ``<stem>.geojson``: a QuPath export (File > Export objects as GeoJSON): a FeatureCollection, a
  single Feature, or a JSON list of Features. A Point is a cell centre; a MultiPoint (a QuPath
  points annotation) one cell per point; a Polygon or MultiPolygon a cell outline, whose area
  centroid is the centre and whose extent the box. Polygon *annotations* are the regions drawn
  around the analysed area whenever the file also holds detection or cell objects, and are then
  skipped. The class is ``properties.classification.name`` (or a plain string classification).
- ``<stem>.csv``: one row per cell with columns ``x``, ``y`` (centre), optionally ``x0, y0, x1,
  y1`` (box, exclusive ends) and ``cell_type`` or ``class`` (the class). Column names are matched
  without regard to case; ``,``, ``;`` (then with decimal commas) and tab separators are read.

Positions are pixels of the full-resolution image (level 0), as QuPath's GeoJSON export writes
them; a position outside the image (a CSV in µm, say) is refused. A point gets a box of
:data:`POINT_BOX_UM` (a typical white cell) so that galleries and QuPath show it as a cell.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from milhema.errors import MilhemaError
from milhema.slides.detect import Detections, DetectOptions
from milhema.slides.wsi import WholeSlide

DETECTION_SUFFIXES = (".geojson", ".csv")
POINT_BOX_UM = 12.0           # side of the box given to a cell known only by its centre
EXTERNAL_VERSION = 1          # bump when the same file would be read differently
_BOX_COLUMNS = ("x0", "y0", "x1", "y1")
_CLASS_COLUMNS = ("cell_type", "class")
# QuPath objects that are cells; an annotation is a hand-drawn object (a region, points, an outline).
_CELL_OBJECTS = frozenset({"detection", "cell", "tile"})


class ExternalDetectionsError(MilhemaError):
    """The external detections file of an image is missing, ambiguous or malformed."""


def detections_path(slide_id: str, image: Path) -> Path:
    """The detections file beside ``image`` (``S1.tiff`` -> ``S1.geojson`` or ``S1.csv``).

    Raises:
        ExternalDetectionsError: neither file exists, or both do.
    """
    found = [image.with_name(image.stem + suffix) for suffix in DETECTION_SUFFIXES]
    found = [path for path in found if path.is_file()]
    if not found:
        raise ExternalDetectionsError(
            f"slide {slide_id}: no external detections for {image.name}: expected {image.stem}.geojson or "
            f"{image.stem}.csv beside it in {image.parent} (--detector external)")
    if len(found) > 1:
        raise ExternalDetectionsError(f"slide {slide_id}: both {found[0].name} and {found[1].name} are beside "
                                      f"{image.name}; keep the one that holds its cells")
    return found[0]


def detect_external(slide: WholeSlide, options: DetectOptions) -> Detections:
    """The cells listed in the file beside ``slide``'s image, in level-0 px, ordered, with their classes.

    Scores are 1 (a listed cell is certain). ``options`` is not used: nothing is searched.

    Raises:
        ExternalDetectionsError: the file is missing or malformed, or a cell lies outside the image.
    """
    start = time.perf_counter()
    path = detections_path(slide.slide_id, slide.path)
    read = read_geojson if path.suffix == ".geojson" else read_csv
    found = read(path, slide.slide_id, slide.mpp)
    width, height = slide.dimensions
    outside = np.flatnonzero((found.centres[:, 0] < 0) | (found.centres[:, 0] >= width)
                             | (found.centres[:, 1] < 0) | (found.centres[:, 1] >= height))
    if len(outside):
        x, y = found.centres[outside[0]]
        raise ExternalDetectionsError(
            f"slide {slide.slide_id}: {path.name}: {len(outside)} cell(s) outside the {width} × {height} px image "
            f"{slide.path.name} (first at x {x:.1f}, y {y:.1f}); positions must be pixels of the full-resolution "
            "image, not µm")
    found.qc = {"cells": float(len(found)), "seconds": time.perf_counter() - start}
    return found.order()


def read_geojson(path: Path, slide_id: str, mpp: float) -> Detections:
    """Cells of a QuPath GeoJSON export (see the module docstring); ``mpp`` sizes the boxes of points.

    Raises:
        ExternalDetectionsError: not JSON, not GeoJSON features, or a geometry that is no cell.
    """
    name = f"slide {slide_id}: {path.name}"
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ExternalDetectionsError(f"{name} is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ExternalDetectionsError(f"{name} is not valid JSON (line {exc.lineno} column {exc.colno}: "
                                      f"{exc.msg})") from None
    features = _features(document, name)
    kinds = [_object_type(feature) for feature in features]
    has_cells = any(kind in _CELL_OBJECTS for kind in kinds)
    cells: list[tuple[float, float, tuple[float, float, float, float] | None, str, str]] = []
    for number, (feature, kind) in enumerate(zip(features, kinds, strict=True), start=1):
        where = f"{name} feature {number}"
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict):
            raise ExternalDetectionsError(f"{where} has no geometry")
        shape = geometry.get("type")
        if has_cells and kind == "annotation" and shape in ("Polygon", "MultiPolygon"):
            continue  # the region the cells were detected in, not a cell
        cell_type = _classification(feature.get("properties"))
        for centre, box, label in _cells_of(geometry, where):
            cells.append((*centre, box, cell_type, label))
    return _detections(cells, name, mpp)


def _features(document: Any, name: str) -> list[dict[str, Any]]:
    features: Any
    if isinstance(document, list):
        features = document
    elif isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features")
    elif isinstance(document, dict) and document.get("type") == "Feature":
        features = [document]
    else:
        features = None
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise ExternalDetectionsError(f"{name} is not a GeoJSON FeatureCollection, Feature or list of Features")
    return features


def _object_type(feature: dict[str, Any]) -> str:
    properties = feature.get("properties")
    kind = properties.get("objectType") if isinstance(properties, dict) else None
    return str(kind).lower() if kind else "detection"


def _classification(properties: Any) -> str:
    """QuPath writes ``{"name": ..., "color": ...}`` (0.4+) or ``{"name": ..., "colorRGB": ...}``."""
    if not isinstance(properties, dict):
        return ""
    value = properties.get("classification")
    if isinstance(value, dict):
        value = value.get("name")
        if isinstance(value, list):   # a derived class such as "Tumor: Positive", stored as its parts
            value = ": ".join(str(part) for part in value)
    return str(value).strip() if isinstance(value, str | int | float) else ""


def _point(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) < 2:
        raise ExternalDetectionsError(f"{where}: a position must be [x, y], got {str(value)[:60]}")
    try:
        x, y = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise ExternalDetectionsError(f"{where}: position {str(value)[:60]} is not numbers") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ExternalDetectionsError(f"{where}: position {str(value)[:60]} is not finite")
    return x, y


def _ring(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) < 3:
        raise ExternalDetectionsError(f"{where}: a polygon ring needs at least 3 positions")
    return np.array([_point(p, where) for p in value], np.float64)


def _cells_of(geometry: dict[str, Any], where: str
              ) -> Iterator[tuple[tuple[float, float], tuple[float, float, float, float] | None, str]]:
    """``(centre, box or None, label for errors)`` of each cell a geometry holds."""
    shape, coordinates = geometry.get("type"), geometry.get("coordinates")
    if shape == "Point":
        yield _point(coordinates, where), None, where
    elif shape == "MultiPoint" and isinstance(coordinates, list):
        for k, point in enumerate(coordinates, start=1):
            yield _point(point, f"{where} point {k}"), None, f"{where} point {k}"
    elif shape in ("Polygon", "MultiPolygon") and isinstance(coordinates, list) and coordinates:
        # The outer ring of each polygon; holes (a vacuole traced as one) do not move a cell's centre much.
        polygons = [coordinates] if shape == "Polygon" else coordinates
        rings = [_ring(polygon[0] if isinstance(polygon, list) and polygon else None, where) for polygon in polygons]
        yield _centroid(rings), _extent(rings), where
    else:
        raise ExternalDetectionsError(f"{where}: geometry {str(shape)[:40]!r} is not a Point, MultiPoint, Polygon "
                                      "or MultiPolygon with coordinates")


def _centroid(rings: list[np.ndarray]) -> tuple[float, float]:
    """Area centroid of the rings (shoelace formula); the mean vertex when they have no area."""
    area = cx = cy = 0.0
    for ring in rings:
        x, y = ring[:, 0], ring[:, 1]
        x1, y1 = np.roll(x, -1), np.roll(y, -1)
        cross = x * y1 - x1 * y
        area += cross.sum() / 2
        cx += ((x + x1) * cross).sum() / 6
        cy += ((y + y1) * cross).sum() / 6
    if abs(area) < 1e-9:
        points = np.concatenate(rings)
        return float(points[:, 0].mean()), float(points[:, 1].mean())
    return cx / area, cy / area


def _extent(rings: list[np.ndarray]) -> tuple[float, float, float, float]:
    """The box of the outline with exclusive ends: the pixel its largest coordinate falls in is inside."""
    points = np.concatenate(rings)
    return (float(points[:, 0].min()), float(points[:, 1].min()), math.floor(points[:, 0].max()) + 1.0,
            math.floor(points[:, 1].max()) + 1.0)


def read_csv(path: Path, slide_id: str, mpp: float) -> Detections:
    """Cells of a CSV with ``x, y`` [, ``x0, y0, x1, y1``] [, ``cell_type`` or ``class``] columns.

    Raises:
        ExternalDetectionsError: not UTF-8, no ``x``/``y`` column, a value that is not a number, or a
            box that does not hold its cell.
    """
    name = f"slide {slide_id}: {path.name}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExternalDetectionsError(f"{name} is not UTF-8 text (byte {exc.start})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ExternalDetectionsError(f"{name} is empty; expected a header row with x and y")
    header_line = lines[0]
    delimiter = max((",", ";", "\t"), key=header_line.count)
    try:
        rows = list(csv.reader(lines, delimiter=delimiter))
    except csv.Error as exc:
        raise ExternalDetectionsError(f"{name} is not a readable CSV ({exc})") from None
    header = [h.strip().lower() for h in rows[0]]
    column = {h: i for i, h in reversed(list(enumerate(header)))}
    if "x" not in column or "y" not in column:
        shown = ", ".join(rows[0][:8]) + (", ..." if len(header) > 8 else "")
        raise ExternalDetectionsError(f"{name} has no 'x' and 'y' columns (found: {shown[:200]}); give each cell's "
                                      "centre in pixels of the full-resolution image")
    boxes = [c for c in _BOX_COLUMNS if c in column]
    if boxes and len(boxes) < 4:
        raise ExternalDetectionsError(f"{name} has box columns {', '.join(boxes)} but not all of x0, y0, x1, y1")
    type_column = next((column[c] for c in _CLASS_COLUMNS if c in column), None)
    decimal_comma = delimiter == ";"
    cells: list[tuple[float, float, tuple[float, float, float, float] | None, str, str]] = []
    for row_number, values in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in values):
            continue
        where = f"{name} row {row_number}"
        if len(values) != len(header):
            raise ExternalDetectionsError(f"{where}: {len(values)} values for {len(header)} columns")

        def number(col: str, values: list[str] = values, where: str = where) -> float:
            raw = values[column[col]].strip()
            try:
                value = float(raw.replace(",", ".") if decimal_comma else raw)
            except ValueError:
                raise ExternalDetectionsError(f"{where}: {col} {raw[:40]!r} is not a number") from None
            if not math.isfinite(value):
                raise ExternalDetectionsError(f"{where}: {col} {raw[:40]!r} is not a finite number")
            return value

        x, y = number("x"), number("y")
        box = None
        if boxes:
            x0, y0, x1, y1 = (number(c) for c in _BOX_COLUMNS)
            if not (x0 <= x <= x1 and y0 <= y <= y1):
                raise ExternalDetectionsError(f"{where}: the box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) does not hold "
                                              f"the centre ({x:g}, {y:g})")
            box = (x0, y0, x1, y1)
        cell_type = values[type_column].strip() if type_column is not None else ""
        cells.append((x, y, box, cell_type, where))
    return _detections(cells, name, mpp, typed=type_column is not None)


def _detections(cells: list[tuple[float, float, tuple[float, float, float, float] | None, str, str]],
                name: str, mpp: float, typed: bool | None = None) -> Detections:
    """Detections of ``(x, y, box, cell type, label)`` rows; types are kept when any is given (or ``typed``)."""
    if not cells:
        return Detections.empty()
    centres = np.array([(x, y) for x, y, _, _, _ in cells], np.float64)
    # A cell's id is its centre rounded to the pixel: two cells there would be one cell twice.
    seen: dict[tuple[int, int], str] = {}
    for (x, y), (_, _, _, _, label) in zip(centres, cells, strict=True):
        key = (round(x), round(y))
        if key in seen:
            first = seen[key].removeprefix(name + " ")
            raise ExternalDetectionsError(f"{label}: the same cell as {first} (x {key[0]}, y {key[1]}); "
                                          "list each cell once")
        seen[key] = label
    half = POINT_BOX_UM / mpp / 2
    boxes = np.array([(math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
                      if box is not None else
                      (math.floor(x - half), math.floor(y - half), math.ceil(x + half), math.ceil(y + half))
                      for x, y, box, _, _ in cells], np.int64)
    types = [t for _, _, _, t, _ in cells]
    keep_types = typed if typed is not None else any(types)
    return Detections(centres.astype(np.float32), boxes.astype(np.int32), np.ones(len(cells), np.float32),
                      cell_types=types if keep_types else None)
