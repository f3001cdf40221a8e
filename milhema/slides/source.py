"""The cells of one slide, ready to be cropped: from a folder of crops or from a scanned smear.

:func:`open_source` turns a manifest row into a :class:`CellSource`. For a whole-slide image it
runs (or reloads) white-cell detection, so embedding sees one list of cells either way: ids,
positions and boxes in level-0 pixels (NaN for crop folders), known cell types, and a picklable
``read(i)`` that DataLoader workers call to get cell i as an RGB array.

Detections are cached beside the bags (``<bags>/detections/<slide_id>.csv`` + ``.json``) and
reused when the detector settings match, so a resumed embedding does not detect again.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from milhema.data.manifest import Slide
from milhema.errors import MilhemaError
from milhema.io import write_csv, write_text
from milhema.slides.crops import CropFolder, list_crops, read_crop
from milhema.slides.detect import DETECTORS, Detections, DetectOptions, match_points
from milhema.slides.wsi import WholeSlide, is_wsi, read_scan_truth, truth_path

log = logging.getLogger(__name__)
MATCH_UM = 5.0   # a detection within 5 µm of an annotated cell centre is that cell
UNMATCHED = "unmatched"


@dataclass
class CellSource:
    """Cells of one slide. Arrays have one row per cell, in reading order.

    ``coords`` float32 [N, 2] and ``bboxes`` int32 [N, 4] are level-0 pixels (``coords`` NaN and
    ``bboxes`` None for crop folders); ``mpp`` is µm per pixel of the images ``read`` returns.
    """

    slide_id: str
    cell_ids: list[str]
    coords: np.ndarray
    bboxes: np.ndarray | None
    cell_types: list[str] | None
    diagnostic: np.ndarray | None
    mpp: float | None
    crop_px: int                    # side of a crop at the source's resolution (0: as stored)
    paths: tuple[Path, ...] = ()    # crop folders
    crops: CropFolder | None = None  # crop folders: what the listing found besides the cells
    slide: WholeSlide | None = None  # scans
    qc: str = ""
    calibration: dict[str, Any] | None = None  # scans: the detector's white point, stains, thresholds

    def __len__(self) -> int:
        return len(self.cell_ids)

    def read(self, i: int) -> np.ndarray:
        """Cell ``i`` as RGB uint8 [h, w, 3]: the crop file, or a ``crop_px`` square cut from level 0."""
        if self.slide is None:
            return read_crop(self.paths[i], f"slide {self.slide_id}: {self.cell_ids[i]}")
        x, y = self.coords[i]
        half = self.crop_px // 2
        return self.slide.read_cached(int(round(x)) - half, int(round(y)) - half, self.crop_px, self.crop_px)


def open_source(slide: Slide, detections_dir: Path, crop_um: float, detector: str = "stain",
                detect_options: DetectOptions | None = None) -> CellSource:
    """The cells of ``slide``; detects white cells first when the source is a whole-slide image.

    Raises:
        MilhemaError: the source does not exist, is neither a crop folder nor a readable scan, or
            has no known mpp.
    """
    source = slide.source
    if source.is_dir():
        crops = list_crops(slide.slide_id, source)
        n = len(crops.paths)
        return CellSource(slide.slide_id, crops.cell_ids, np.full((n, 2), np.nan, np.float32), None,
                          None if crops.cell_types is None else list(crops.cell_types),
                          None if crops.diagnostic is None else np.array(crops.diagnostic, dtype=bool),
                          slide.mpp, 0, paths=crops.paths, crops=crops)
    if not source.exists():
        raise MilhemaError(f"slide {slide.slide_id}: source {source} does not exist")
    if not is_wsi(source):
        raise MilhemaError(f"slide {slide.slide_id}: source {source} is neither a folder of crops nor a "
                           "whole-slide image (.tif, .tiff, .svs, .ndpi, …)")
    wsi = WholeSlide(slide.slide_id, source, slide.mpp)
    if detector not in DETECTORS:
        raise MilhemaError(f"unknown detector {detector!r}; available: {', '.join(DETECTORS)}")
    found = _cached_or_detect(wsi, detections_dir, detector, detect_options or DetectOptions())
    n = len(found)
    cell_ids = [f"{round(float(x))}_{round(float(y))}" for x, y in found.centres]
    cell_types, diagnostic = _attach_truth(wsi, found)
    crop_px = max(8, int(round(crop_um / wsi.mpp)))
    return CellSource(slide.slide_id, cell_ids, found.centres.astype(np.float32).reshape(n, 2),
                      found.bboxes.astype(np.int32).reshape(n, 4), cell_types, diagnostic, wsi.mpp, crop_px,
                      slide=wsi, qc=found.qc_line(slide.slide_id), calibration=found.calibration or None)


def _cached_or_detect(wsi: WholeSlide, folder: Path, detector: str, options: DetectOptions) -> Detections:
    csv_path = folder / f"{wsi.slide_id}.csv"
    meta_path = folder / f"{wsi.slide_id}.json"
    signature = options.signature() if detector == "stain" else json.dumps({"detector": detector})
    if csv_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("signature") == signature and meta.get("source") == str(wsi.path.resolve()):
                found = _read_detections(csv_path, meta.get("qc", {}))
                found.calibration = meta.get("calibration", {})
                return found
        except (OSError, ValueError, KeyError):
            log.warning("slide %s: cached detections unreadable; detecting again", wsi.slide_id)
    found = DETECTORS[detector](wsi, options)
    rows = [(f"{x:.1f}", f"{y:.1f}", *map(int, box), f"{score:.4f}")
            for (x, y), box, score in zip(found.centres, found.bboxes, found.scores, strict=True)]
    write_csv(csv_path, ["x", "y", "x0", "y0", "x1", "y1", "score"], rows)
    write_text(meta_path, json.dumps({"signature": signature, "source": str(wsi.path.resolve()),
                                      "mpp": wsi.mpp, "qc": found.qc, "calibration": found.calibration},
                                     indent=2) + "\n")
    return found


def _read_detections(path: Path, qc: dict[str, float]) -> Detections:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        out = Detections.empty()
        out.qc = qc
        return out
    centres = np.array([(float(r["x"]), float(r["y"])) for r in rows], np.float32)
    boxes = np.array([[int(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in rows], np.int32)
    scores = np.array([float(r["score"]) for r in rows], np.float32)
    return Detections(centres, boxes, scores, qc)


def _attach_truth(wsi: WholeSlide, found: Detections) -> tuple[list[str] | None, np.ndarray | None]:
    """Cell types and diagnostic flags of the annotated cells the detections hit, when a truth file exists."""
    path = truth_path(wsi.path)
    if not path.is_file():
        return None, None
    xy, types, diag = read_scan_truth(path, wsi.slide_id)
    cell_types = [UNMATCHED] * len(found)
    diagnostic = np.zeros(len(found), dtype=bool)
    for t, f in match_points(xy, found.centres.astype(np.float64), MATCH_UM / wsi.mpp):
        cell_types[f] = types[t]
        diagnostic[f] = diag[t]
    if len(xy):
        log.info("slide %s: %d of %d annotated cells detected", wsi.slide_id,
                 sum(t != UNMATCHED for t in cell_types), len(xy))
    return cell_types, diagnostic
