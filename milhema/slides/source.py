"""The cells of one slide, ready to be cropped: from a folder of crops, a scanned smear or photographed fields.

:func:`open_source` turns a manifest row into a :class:`CellSource`. For a whole-slide image, and
for each image of a folder of photographed fields, it runs (or reloads) the chosen detector
(:mod:`milhema.slides.detectors`), so embedding sees one list of cells whatever the source: ids,
positions and boxes (level-0 pixels of the scan, pixels of the cell's field, NaN for crop folders),
known cell types, and a picklable ``read(i)`` that DataLoader workers call to get cell i as an RGB array.

Detections are cached beside the bags (``<bags>/detections/<slide_id>.csv`` + ``.json``) and
reused when the detector's signature (name, version, settings, input files) and the source match,
so a resumed embedding does not detect again and a changed detector does.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np

from milhema.data.manifest import Slide
from milhema.errors import MilhemaError
from milhema.io import write_csv, write_text
from milhema.slides.crops import IMAGE_SUFFIXES, CropFolder, list_crops, read_attribute_columns, read_crop
from milhema.slides.detect import Detections, DetectOptions, match_points
from milhema.slides.detectors import DEFAULT_DETECTOR, Detector, get_detector
from milhema.slides.fields import FieldImage, list_fields
from milhema.slides.wsi import WholeSlide, is_wsi, read_scan_truth, truth_path

log = logging.getLogger(__name__)
# Fields up to this side (px) are detected as one tile (see field_options).
FIELD_TILE_PX = 4096


def field_options(options: DetectOptions) -> DetectOptions:
    """Detection settings for one photographed field.

    A field is a few tiles: a process pool per field would cost more than it saves. A field up to
    :data:`FIELD_TILE_PX` a side is read as one tile: its red cells and chromatin are learnt from
    the whole field, not from a strip at its edge (a 1280 px field cut at 1024 px left 256 px strips
    of red cells whose overlaps passed for nuclei).
    """
    return replace(options, workers=1, tile_px=max(options.tile_px, FIELD_TILE_PX))
MATCH_UM = 5.0   # a detection within 5 µm of an annotated cell centre is that cell
UNMATCHED = "unmatched"
_DETECTION_COLUMNS = ["x", "y", "x0", "y0", "x1", "y1", "score"]


@dataclass
class CellSource:
    """Cells of one slide. Arrays have one row per cell, in reading order.

    ``coords`` float32 [N, 2] and ``bboxes`` int32 [N, 4] are level-0 pixels of a scan, or pixels of
    the field ``field[i]`` for a folder of fields (``coords`` NaN and ``bboxes`` None for crop
    folders); ``mpp`` is µm per pixel of the images ``read`` returns.
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
    images: tuple[WholeSlide, ...] = ()   # a scan: the slide; fields: one FieldImage per field
    field: np.ndarray | None = None       # fields: int32 [N], the index in ``images`` of each cell's field
    field_names: tuple[str, ...] = ()     # fields: the image file names, in ``images`` order
    qc: str = ""
    attribute_names: tuple[str, ...] = ()       # annotated anomaly attributes (truth files' 0/1 columns)
    attribute_labels: np.ndarray | None = None  # int8 [N, A]: 1, 0, -1 (not annotated)
    calibration: dict[str, Any] | None = None  # scans: the detector's white point, stains, thresholds
    _reading: int = dataclass_field(default=-1, repr=False)

    def __len__(self) -> int:
        return len(self.cell_ids)

    def read(self, i: int) -> np.ndarray:
        """Cell ``i`` as RGB uint8 [h, w, 3]: the crop file, or a ``crop_px`` square cut from its scan or field."""
        if not self.images:
            return read_crop(self.paths[i], f"slide {self.slide_id}: {self.cell_ids[i]}")
        k = 0 if self.field is None else int(self.field[i])
        if k != self._reading and 0 <= self._reading < len(self.images):
            # Cells come field after field: the field done with is let go instead of kept decoded.
            self.images[self._reading].close()
        self._reading = k
        x, y = self.coords[i]
        half = self.crop_px // 2
        return self.images[k].read_cached(int(round(x)) - half, int(round(y)) - half, self.crop_px, self.crop_px)

    def close(self) -> None:
        """Close the scan or field files (they reopen on the next read, in whichever process reads)."""
        for image in self.images:
            image.close()
        self._reading = -1


def detection_signature(slide: Slide, detector: str = DEFAULT_DETECTOR,
                        options: DetectOptions | None = None) -> str:
    """The signature of ``detector`` on ``slide``'s scan or fields (see :meth:`Detector.signature`).

    Raises:
        MilhemaError: unknown detector, or an input file it needs is missing.
    """
    return get_detector(detector).signature(options or DetectOptions(), slide.slide_id, _image_paths(slide))


def _image_paths(slide: Slide) -> list[Path]:
    if slide.source_kind == "fields":
        return list(list_fields(slide.slide_id, slide.source).paths)
    return [slide.source]


def open_source(slide: Slide, detections_dir: Path, crop_um: float, detector: str = DEFAULT_DETECTOR,
                detect_options: DetectOptions | None = None) -> CellSource:
    """The cells of ``slide``; detects white cells first on a scan and on each field of a fields folder.

    Raises:
        MilhemaError: the source does not exist or is not what its kind says, a scan or field cannot be
            read or has no known mpp, the detector is unknown, or its input files are missing or malformed.
    """
    source = slide.source
    kind = slide.source_kind
    if kind == "crops":
        crops = list_crops(slide.slide_id, source)
        n = len(crops.paths)
        return CellSource(slide.slide_id, crops.cell_ids, np.full((n, 2), np.nan, np.float32), None,
                          None if crops.cell_types is None else list(crops.cell_types),
                          None if crops.diagnostic is None else np.array(crops.diagnostic, dtype=bool),
                          slide.mpp, 0, paths=crops.paths, crops=crops, attribute_names=crops.attribute_names,
                          attribute_labels=None if crops.attribute_labels is None else
                          np.array(crops.attribute_labels, np.int8).reshape(n, len(crops.attribute_names)))
    found_by = get_detector(detector)
    options = detect_options or DetectOptions()
    names: tuple[str, ...] = ()
    if kind == "fields":
        listing = list_fields(slide.slide_id, source)
        if listing.skipped:
            log.warning("slide %s: fields folder %s holds %d entries that are not field images (%s); skipped",
                        slide.slide_id, source, len(listing.skipped), ", ".join(listing.skipped[:3])
                        + (", ..." if len(listing.skipped) > 3 else ""))
        if not listing.paths:
            log.warning("slide %s: fields folder %s holds no images (%s)", slide.slide_id, source,
                        ", ".join(sorted(IMAGE_SUFFIXES)))
        options = field_options(options)
        images: list[WholeSlide] = [FieldImage(slide.slide_id, path, slide.mpp) for path in listing.paths]
        names = listing.names
    else:
        if not source.exists():
            raise MilhemaError(f"slide {slide.slide_id}: source {source} does not exist")
        if not is_wsi(source):
            hint = (" (a photographed field? put the fields of a slide in a folder and give it kind 'fields' "
                    "in slides.csv)" if source.suffix.lower() in IMAGE_SUFFIXES else "")
            raise MilhemaError(f"slide {slide.slide_id}: source {source} is neither a folder of crops nor a "
                               f"whole-slide image (.tif, .tiff, .svs, .ndpi, …){hint}")
        images = [WholeSlide(slide.slide_id, source, slide.mpp)]
    found, qc = _cached_or_detect(slide, images, names, detections_dir, found_by, options)
    return _cells(slide, images, names, found, qc, found_by, crop_um)


def _cells(slide: Slide, images: list[WholeSlide], names: tuple[str, ...], found: list[Detections],
           qc: dict[str, float], detector: Detector, crop_um: float) -> CellSource:
    """One :class:`CellSource` from the detections of each image, with types from the detector or truth files."""
    ids: list[str] = []
    types: list[list[str] | None] = []
    flags: list[np.ndarray | None] = []
    attributes: list[tuple[tuple[str, ...], np.ndarray]] = []
    for k, (image, cells) in enumerate(zip(images, found, strict=True)):
        prefix = f"{names[k]}:" if names else ""   # positions repeat between fields, not within one
        ids += [f"{prefix}{round(float(x))}_{round(float(y))}" for x, y in cells.centres]
        cell_types, diagnostic = _attach_truth(image, cells)
        attributes.append(_attach_attributes(image, cells))
        # A detector that classifies (QuPath's classes, say) names the types; truth files still flag cells.
        types.append(list(cells.cell_types) if cells.cell_types is not None else cell_types)
        flags.append(diagnostic)
    n = len(ids)
    cell_types = None
    if any(t is not None for t in types):
        cell_types = [c for t, cells in zip(types, found, strict=True) for c in (t if t is not None else [""] * len(cells))]
    # A bag carries the diagnostic flag for every cell or none (as crop folders do).
    known = [f for f in flags if f is not None]
    diagnostic = np.concatenate(known) if known and len(known) == len(flags) else None
    mpp = images[0].mpp if images else slide.mpp
    centres = np.concatenate([f.centres for f in found]) if found else np.zeros((0, 2))
    boxes = np.concatenate([f.bboxes for f in found]) if found else np.zeros((0, 4))
    field = np.concatenate([np.full(len(f), k, np.int32) for k, f in enumerate(found)]) if names else None
    attribute_names, attribute_labels = _union_attributes(attributes)
    return CellSource(slide.slide_id, ids, centres.astype(np.float32).reshape(n, 2),
                      boxes.astype(np.int32).reshape(n, 4), cell_types, diagnostic, mpp,
                      max(8, int(round(crop_um / mpp))) if mpp else 0, images=tuple(images),
                      field=None if field is None else field.reshape(n), field_names=names,
                      qc=_qc_line(slide.slide_id, found, qc, names, detector), attribute_names=attribute_names,
                      attribute_labels=attribute_labels,
                      # A scan's calibration, for the morphology of its crops; each field has its own (in the
                      # detection JSON) and its crops are measured against their own white.
                      calibration=found[0].calibration or None if len(found) == 1 and not names else None)


def _union_attributes(parts: list[tuple[tuple[str, ...], np.ndarray]]) -> tuple[tuple[str, ...], np.ndarray | None]:
    """One ``[N, A]`` table over the attribute columns of every image's truth file (-1 where a file lacks one)."""
    names = tuple(dict.fromkeys(name for part_names, _ in parts for name in part_names))
    if not names:
        return (), None
    blocks = []
    for part_names, labels in parts:
        block = np.full((len(labels), len(names)), -1, np.int8)
        for j, name in enumerate(part_names):
            block[:, names.index(name)] = labels[:, j]
        blocks.append(block)
    return names, np.concatenate(blocks)


def _qc_line(slide_id: str, found: list[Detections], qc: dict[str, float], names: tuple[str, ...],
             detector: Detector) -> str:
    n = sum(len(f) for f in found)
    if not names and "tiles" in qc:   # a detector that searched the scan tile by tile says how much it read
        return found[0].qc_line(slide_id)
    where = f" in {len(names)} fields" if names else ""
    return f"slide {slide_id}: {n} cells{where} ({detector.name} detector, {qc.get('seconds', 0.0):.1f} s)"


def _cached_or_detect(slide: Slide, images: list[WholeSlide], names: tuple[str, ...], folder: Path,
                      detector: Detector, options: DetectOptions) -> tuple[list[Detections], dict[str, float]]:
    """Detections of each image (reloaded when the signature and source match) and their summed QC numbers."""
    csv_path = folder / f"{slide.slide_id}.csv"
    meta_path = folder / f"{slide.slide_id}.json"
    signature = detector.signature(options, slide.slide_id, [image.path for image in images])
    source = str(slide.source.resolve())
    if csv_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if (meta.get("signature") == signature and meta.get("source") == source
                    and meta.get("fields", []) == list(names)):
                cached = {k: float(v) for k, v in meta.get("qc", {}).items()}
                found = _read_detections(csv_path, cached, len(images))
                calibrations = meta["calibrations"] if names else [meta.get("calibration", {})]
                for cells, calibration in zip(found, calibrations, strict=False):
                    cells.calibration = dict(calibration)
                return found, cached
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("slide %s: cached detections unreadable; detecting again", slide.slide_id)
    found = [detector.detect(image, options) for image in images]
    qc: dict[str, float] = {}
    for cells in found:
        for key, value in cells.qc.items():
            qc[key] = qc.get(key, 0.0) + float(value)
    typed = any(cells.cell_types is not None for cells in found)
    header = _DETECTION_COLUMNS + (["field"] if names else []) + (["cell_type"] if typed else [])
    rows = []
    for k, cells in enumerate(found):
        types = cells.cell_types if cells.cell_types is not None else [""] * len(cells)
        for (x, y), box, score, cell_type in zip(cells.centres, cells.bboxes, cells.scores, types, strict=True):
            rows.append([f"{x:.1f}", f"{y:.1f}", *map(int, box), f"{score:.4f}", *([k] if names else []),
                         *([cell_type] if typed else [])])
    write_csv(csv_path, header, rows)
    meta_out: dict[str, object] = {"signature": signature, "source": source, "mpp": images[0].mpp if images else None,
                                   "qc": qc}
    if names:   # each field calibrated from its own pixels
        meta_out["calibrations"] = [cells.calibration for cells in found]
    elif found:
        meta_out["calibration"] = found[0].calibration
    if names:
        meta_out["fields"] = list(names)
    write_text(meta_path, json.dumps(meta_out, indent=2) + "\n")
    return found, qc


def _read_detections(path: Path, qc: dict[str, float], n_images: int) -> list[Detections]:
    """The cached detections of each image (one for a scan), split by the ``field`` column."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        typed = "cell_type" in (reader.fieldnames or ())
    out = []
    for k in range(n_images):
        mine = [r for r in rows if int(r.get("field") or 0) == k]
        if not mine:
            empty = Detections.empty()
            empty.qc = qc
            empty.cell_types = [] if typed else None
            out.append(empty)
            continue
        centres = np.array([(float(r["x"]), float(r["y"])) for r in mine], np.float32)
        boxes = np.array([[int(r[c]) for c in ("x0", "y0", "x1", "y1")] for r in mine], np.int32)
        scores = np.array([float(r["score"]) for r in mine], np.float32)
        out.append(Detections(centres, boxes, scores, qc, [r["cell_type"] for r in mine] if typed else None))
    return out


# Columns of a scan's truth file that are not anomaly attributes.
_SCAN_TRUTH_COLUMNS = frozenset({"cell_id", "x", "y", "x0", "y0", "x1", "y1", "cell_type", "diagnostic"})


def _attach_attributes(wsi: WholeSlide, found: Detections) -> tuple[tuple[str, ...], np.ndarray]:
    """The truth file's anomaly attributes of the annotated cells the detections hit (-1 for the others)."""
    names, rows = read_attribute_columns(wsi.slide_id, truth_path(wsi.path), _SCAN_TRUTH_COLUMNS)
    labels = np.full((len(found), len(names)), -1, np.int8)
    if names and rows:
        xy, _, _ = read_scan_truth(truth_path(wsi.path), wsi.slide_id)
        for t, f in match_points(xy, found.centres.astype(np.float64), MATCH_UM / wsi.mpp):
            labels[f] = rows[t][1]
    return names, labels


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
