"""White-cell detection and segmentation on real smear images with expert masks (the wbc-seg sets).
Prints a table and, with --record, appends it to docs/PERFORMANCE.md.

    python tools/bench_wbcseg.py [--data ../shared/data/wbc-seg] [--scratch /tmp/bench_wbcseg] [--record]

Each image of a set (``cellavision/``: 300 × 300 px, ~0.08 µm/px; ``tecom/``: 120 × 120 px,
~0.16 µm/px) is written as a flat TIFF and opened as a scan with the set's µm per pixel, then
detected by the same call ``milhema embed`` makes for a scan (``get_detector("stain")``). Per image
there is one white cell and an expert mask (nucleus 255, cytoplasm 128, background 0):

- found: a detection centre lies inside the mask's cell (nucleus or cytoplasm);
- extra: every other detection (a second detection on the same cell counts as extra);
- Dice of the detector's own segmentation (the region of the detection found, and its nucleus;
  0 when the cell is not found) and of ``milhema.embed.morphology.segment_cell`` on the
  ``--crop-um`` square that ``milhema embed`` cuts around the detection found (around the mask's
  centroid when none is), pasted back into the image.

Rows: each set whole, then its even-numbered images (used while developing) and its odd-numbered
ones (held out: never looked at while choosing the method).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from perf_record import report  # tools/ is on sys.path when a tool runs as a script
from PIL import Image

from milhema.embed.morphology import segment_cell
from milhema.slides import detect
from milhema.slides.calibrate import Calibration
from milhema.slides.detect import DetectOptions
from milhema.slides.detectors import get_detector
from milhema.slides.wsi import WholeSlide

SETS = {"cellavision": 0.08, "tecom": 0.16}   # µm per pixel, estimated from cell sizes (data README)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wbc-seg"


@dataclass
class Result:
    """One image: found (bool), extra detections, Dice of (detector cell, detector nucleus,
    morphology cell, morphology nucleus); NaN where the detector exposes no masks."""

    number: int
    found: bool
    extra: int
    dice: tuple[float, float, float, float]


@dataclass
class Summary:
    rows: list[Result] = field(default_factory=list)

    def line(self, name: str) -> str:
        n = len(self.rows)
        found = sum(r.found for r in self.rows)
        extra = sum(r.extra for r in self.rows) / max(n, 1)
        dice = np.array([r.dice for r in self.rows], dtype=float).reshape(-1, 4)
        cells = " | ".join("—" if np.isnan(d).all() else f"{np.nanmean(d):.3f}" for d in dice.T)
        return f"| {name} | {n} | {found / max(n, 1):.3f} ({found}) | {extra:.3f} | {cells} |"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 1.0


def as_scan(rgb: np.ndarray, path: Path) -> None:
    """A flat (one-level) tiled TIFF, as a camera field saved for milhema would be."""
    if not path.exists():
        tifffile.imwrite(path, rgb, photometric="rgb", tile=(128, 128))


def one_image(folder: Path, number: int, mpp: float, scratch: Path, crop_um: float) -> Result:
    stem = f"{number:03d}"
    rgb = np.asarray(Image.open(folder / f"{stem}.png").convert("RGB"))
    mask = np.asarray(Image.open(folder / f"{stem}_mask.png"))
    if mask.ndim == 3:
        mask = mask[..., 0]
    truth_cell, truth_nucleus = mask > 64, mask > 192
    path = scratch / f"{folder.name}_{stem}.tiff"
    as_scan(rgb, path)
    slide = WholeSlide(stem, path, mpp)
    found = get_detector("stain").detect(slide, DetectOptions(progress=False))
    h, w = mask.shape
    inside = [i for i, (x, y) in enumerate(found.centres)
              if 0 <= round(float(y)) < h and 0 <= round(float(x)) < w and truth_cell[round(float(y)), round(float(x))]]
    hit = inside[0] if inside else None
    # The detector's own masks, where this version of it exposes them (the regions of one tile).
    det_cell = det_nucleus = float("nan")
    segment_regions = getattr(detect, "segment_regions", None)
    if segment_regions is not None:
        image = slide.read(0, 0, w, h)
        seg = segment_regions(image, mpp, DetectOptions(progress=False), Calibration.from_dict(found.calibration))
        det_cell = det_nucleus = 0.0
        if hit is not None:
            x, y = found.centres[hit]
            distance = np.hypot(seg.centres[:, 0] - x, seg.centres[:, 1] - y) if len(seg.centres) else np.zeros(0)
            if distance.size and distance.min() < 1.0:
                k = int(np.argmin(distance)) + 1
                det_cell = dice(seg.labels == k, truth_cell)
                det_nucleus = dice((seg.labels == k) & seg.nucleus, truth_nucleus)
    # Morphology: the crop embed cuts around the detection (the mask's centroid if none).
    if hit is not None:
        cx, cy = (int(round(float(v))) for v in found.centres[hit])
    else:
        ys, xs = np.nonzero(truth_cell)
        cx, cy = int(round(xs.mean())), int(round(ys.mean()))
    crop_px = max(8, int(round(crop_um / mpp)))
    x0, y0 = cx - crop_px // 2, cy - crop_px // 2
    crop = slide.read_cached(x0, y0, crop_px, crop_px)
    if segment_regions is not None:   # embed hands the slide's calibration to the morphology
        cell, nucleus = segment_cell(crop, mpp, Calibration.from_dict(found.calibration))
    else:
        cell, nucleus = segment_cell(crop, mpp)
    morph_cell = np.zeros_like(truth_cell)
    morph_nucleus = np.zeros_like(truth_cell)
    ys, xs = np.nonzero(cell)
    keep = (ys + y0 >= 0) & (ys + y0 < h) & (xs + x0 >= 0) & (xs + x0 < w)
    morph_cell[ys[keep] + y0, xs[keep] + x0] = True
    ys, xs = np.nonzero(nucleus)
    keep = (ys + y0 >= 0) & (ys + y0 < h) & (xs + x0 >= 0) & (xs + x0 < w)
    morph_nucleus[ys[keep] + y0, xs[keep] + x0] = True
    slide.close()
    return Result(number, hit is not None, len(found) - (hit is not None),
                  (det_cell, det_nucleus, dice(morph_cell, truth_cell), dice(morph_nucleus, truth_nucleus)))


def run_set(data: Path, name: str, mpp: float, scratch: Path, crop_um: float, limit: int,
            subset: str) -> list[Result]:
    folder = data / name
    numbers = sorted(int(p.stem) for p in folder.glob("[0-9][0-9][0-9].png"))
    if subset != "all":
        numbers = [k for k in numbers if k % 2 == (subset == "odd")]
    if limit:
        numbers = numbers[:limit]
    (scratch / name).mkdir(parents=True, exist_ok=True)
    return [one_image(folder, k, mpp, scratch / name, crop_um) for k in numbers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the wbc-seg folder")
    parser.add_argument("--scratch", type=Path, default=Path("bench_wbcseg"), help="folder for the TIFF scans")
    parser.add_argument("--crop-um", type=float, default=24.0, help="crop side for the morphology, as embed's")
    parser.add_argument("--limit", type=int, default=0, help="first N images of each set only (0: all)")
    parser.add_argument("--subset", choices=("all", "even", "odd"), default="all",
                        help="even: the development images only")
    parser.add_argument("--label", default="", help="added to the heading (e.g. 'before the change')")
    parser.add_argument("--misses", action="store_true", help="list the images whose cell is not found")
    parser.add_argument("--record", action="store_true", help="append the table to docs/PERFORMANCE.md")
    args = parser.parse_args()
    lines = [f"## Real white cells: detection and segmentation on wbc-seg ({platform.machine()}, "
             f"{os.cpu_count()} CPUs, {datetime.date.today().isoformat()}){' — ' + args.label if args.label else ''}",
             "",
             f"`python tools/bench_wbcseg.py{' --limit ' + str(args.limit) if args.limit else ''}`: each image "
             "written as a flat TIFF scan, detected with the registered `stain` detector as `milhema embed` does; "
             "found = a detection centre inside the expert's cell; extra = other detections per image; "
             "Dice averaged over all images (0 for the detector's masks where the cell is not found); "
             "even = images used while developing, odd = held out.",
             "",
             "| set | images | found | extra / image | Dice cell (detector) | Dice nucleus (detector) "
             "| Dice cell (morphology) | Dice nucleus (morphology) |",
             "|---|---|---|---|---|---|---|---|"]
    missed: list[str] = []
    for name, mpp in SETS.items():
        results = run_set(args.data, name, mpp, args.scratch, args.crop_um, args.limit, args.subset)
        lines.append(Summary(results).line(f"{name} ({mpp} µm/px)"))
        lines.append(Summary([r for r in results if r.number % 2 == 0]).line(f"{name}, even (development)"))
        lines.append(Summary([r for r in results if r.number % 2 == 1]).line(f"{name}, odd (held out)"))
        missed += [f"{name}/{r.number:03d}" for r in results if not r.found]
        missed += [f"{name}/{r.number:03d} (+{r.extra})" for r in results if r.found and r.extra]
    if args.misses:
        lines += ["", "Not found or with extra detections: " + (", ".join(missed) or "none")]
    report(lines, args.record)


if __name__ == "__main__":
    main()
