"""QuPath-importable GeoJSON of a slide's cells (File > Import objects, QuPath 0.4+).

Each cell is a detection Feature in level-0 pixel coordinates: a closed 5-point Polygon from its
box, or a Point at its centre without a box. ``measurements`` is a flat ``{name: number}`` dict,
the form QuPath 0.4+ writes when exporting GeoJSON and reads back on import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Stable colours per cell type (QuPath shows classification colours as [r, g, b] 0-255).
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def type_colour(name: str, names: Sequence[str]) -> list[int]:
    """The ``[r, g, b]`` of cell type ``name`` among all ``names`` (sorted for stability)."""
    ordered = sorted(set(names))
    return list(_PALETTE[ordered.index(name) % len(_PALETTE)]) if name in ordered else list(_PALETTE[7])


def slide_geojson(cell_ids: Sequence[str], coords: np.ndarray, bboxes: np.ndarray, cell_types: Sequence[str] | None,
                  scores: np.ndarray, pct: np.ndarray, class_scores: np.ndarray | None = None,
                  classes: Sequence[str] = ()) -> dict[str, Any]:
    """A FeatureCollection of one slide's cells.

    Args:
        coords: ``[N, 2]`` level-0 px centres (x, y).
        bboxes: ``[N, 4]`` level-0 px (x0, y0, x1, y1); a row with NaN becomes a Point.
        scores, pct: ``[N]`` score and its rank percentile within the patient (0-100].
        class_scores: ``[N, K]`` per-class scores or None.
    """
    names = [str(t) if t else "cell" for t in cell_types] if cell_types is not None else ["cell"] * len(cell_ids)
    colours = {name: type_colour(name, names) for name in set(names)}
    features = []
    for i, cell_id in enumerate(cell_ids):
        box = bboxes[i]
        if np.isfinite(box).all():
            x0, y0, x1, y1 = (float(v) for v in box)
            geometry: dict[str, Any] = {"type": "Polygon",
                                        "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}
        else:
            geometry = {"type": "Point", "coordinates": [float(coords[i, 0]), float(coords[i, 1])]}
        measurements = {"score": float(scores[i]), "rank_pct": float(pct[i])}
        if class_scores is not None:
            measurements.update({f"score_{c}": float(class_scores[i, k]) for k, c in enumerate(classes)})
        features.append({
            "type": "Feature",
            "geometry": geometry,
            "properties": {"objectType": "detection", "name": str(cell_id),
                           "classification": {"name": names[i], "color": colours[names[i]]},
                           "measurements": measurements},
        })
    return {"type": "FeatureCollection", "features": features}
