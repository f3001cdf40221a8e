"""Whole-slide images (pyramidal TIFF, SVS, NDPI, OME-TIFF …) read through tiffslide.

:class:`WholeSlide` is a thin, picklable handle: the file is opened lazily in each process that
reads from it, so detection and embedding workers can share one object. Coordinates are level-0
pixels (x right, y down) unless a level is named; regions come back as RGB uint8 arrays.
"""

from __future__ import annotations

import csv
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from milhema.errors import MilhemaError

WSI_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf"})
TRUTH_SUFFIX = ".cells.csv"   # optional per-cell truth beside a scan: <stem>.cells.csv
_BLOCK = 512                  # px, side of the blocks :meth:`WholeSlide.read_cached` keeps
CACHE_BLOCKS = 48             # blocks kept per process (~38 MB)


class SlideReadError(MilhemaError):
    """A whole-slide file cannot be opened, has no usable resolution, or a region cannot be read."""


def is_wsi(path: Path) -> bool:
    """True for a file whose suffix is a whole-slide format (a folder is a crop export)."""
    return path.is_file() and path.suffix.lower() in WSI_SUFFIXES


def truth_path(source: Path) -> Path:
    """``slides/S1.tiff`` → ``slides/S1.cells.csv`` (simulated or annotated cells of that scan)."""
    return source.with_name(source.stem + TRUTH_SUFFIX)


@dataclass
class WholeSlide:
    """One scanned slide.

    Args:
        slide_id: used in every error message.
        path: the file.
        mpp: µm per level-0 pixel from slides.csv; overrides the file's metadata when given.

    Raises:
        SlideReadError: on construction, when the file cannot be opened or no mpp is known.
    """

    slide_id: str
    path: Path
    mpp_override: float | None = None
    mpp: float = field(init=False)
    level_dimensions: tuple[tuple[int, int], ...] = field(init=False)
    level_downsamples: tuple[float, ...] = field(init=False)
    _handle: Any = field(init=False, default=None, repr=False)
    _cache: OrderedDict[tuple[int, int], np.ndarray] = field(init=False, default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        handle = self._open()
        try:
            self.level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
            value = handle.properties.get("tiffslide.mpp-x")
        except Exception as exc:  # tiffslide parses lazily: a TIFF header over garbage fails here, not on open
            self.close()
            raise self._unreadable(exc) from exc
        mpp = self.mpp_override
        if mpp is None:
            mpp = float(value) if value not in (None, "") else None
        if mpp is None or not math.isfinite(mpp) or mpp <= 0:
            raise SlideReadError(f"slide {self.slide_id}: {self.path.name} has no microns-per-pixel in its "
                                 "metadata; add an 'mpp' column to slides.csv")
        self.mpp = float(mpp)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None   # file handles do not cross processes; reopened on first read
        state["_cache"] = OrderedDict()
        return state

    def _open(self) -> Any:
        if self._handle is None:
            import tiffslide

            if not self.path.is_file():
                raise SlideReadError(f"slide {self.slide_id}: {self.path} does not exist")
            try:
                self._handle = tiffslide.TiffSlide(self.path)
            except Exception as exc:  # tiffslide/tifffile raise many types for a bad file
                raise self._unreadable(exc) from exc
        return self._handle

    def _unreadable(self, exc: Exception) -> SlideReadError:
        return SlideReadError(f"slide {self.slide_id}: {self.path.name} is not a readable whole-slide "
                              f"image ({type(exc).__name__}: {exc})")

    def close(self) -> None:
        self._cache.clear()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in px."""
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level(self, target_mpp: float) -> int:
        """The coarsest level whose pixels are no larger than ``target_mpp`` µm (level 0 if none)."""
        best = 0
        for level in range(len(self.level_downsamples)):
            if self.level_mpp(level) <= target_mpp * 1.001:
                best = level
        return best

    def read(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """RGB uint8 [height, width, 3] at ``level``; (x, y) is the top-left corner in level-0 px.

        Parts outside the slide come back white (glass) rather than black, so that a cell at the
        edge of the scan is cropped against a background that looks like the rest of the smear.
        """
        lw, lh = self.level_dimensions[level]
        down = self.level_downsamples[level]
        lx, ly = int(round(x / down)), int(round(y / down))
        ix0, iy0 = max(lx, 0), max(ly, 0)
        ix1, iy1 = min(lx + int(width), lw), min(ly + int(height), lh)
        out = np.full((int(height), int(width), 3), 255, np.uint8)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        handle = self._open()
        try:
            region = handle.read_region((int(round(ix0 * down)), int(round(iy0 * down))), level,
                                        (ix1 - ix0, iy1 - iy0), as_array=True)
        except Exception as exc:
            raise SlideReadError(f"slide {self.slide_id}: cannot read the region at ({x}, {y}) level {level} "
                                 f"of {self.path.name} ({type(exc).__name__}: {exc})") from exc
        region = np.asarray(region)
        if region.ndim == 2:
            region = np.repeat(region[..., None], 3, axis=2)
        if region.shape[2] == 4:
            alpha = region[..., 3:4].astype(np.float32) / 255.0
            region = (region[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        out[iy0 - ly:iy1 - ly, ix0 - lx:ix1 - lx] = region[..., :3]
        return out

    def read_cached(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Like :meth:`read` at level 0, assembled from cached 512 px blocks aligned to the slide grid.

        Cells are read in top-to-bottom order and neighbours share tiles: decoding each block once
        (per process) instead of once per crop is what keeps embedding from scans near the
        backbone's speed. The cache holds :data:`CACHE_BLOCKS` blocks (~0.8 MB each).
        """
        out = np.empty((int(height), int(width), 3), np.uint8)
        for by in range(int(y) // _BLOCK * _BLOCK, int(y) + int(height), _BLOCK):
            for bx in range(int(x) // _BLOCK * _BLOCK, int(x) + int(width), _BLOCK):
                block = self._block(bx, by)
                y0, y1 = max(by, int(y)), min(by + _BLOCK, int(y) + int(height))
                x0, x1 = max(bx, int(x)), min(bx + _BLOCK, int(x) + int(width))
                out[y0 - int(y):y1 - int(y), x0 - int(x):x1 - int(x)] = block[y0 - by:y1 - by, x0 - bx:x1 - bx]
        return out

    def _block(self, bx: int, by: int) -> np.ndarray:
        key = (bx, by)
        block = self._cache.get(key)
        if block is None:
            block = self.read(bx, by, _BLOCK, _BLOCK)
            self._cache[key] = block
            if len(self._cache) > CACHE_BLOCKS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return block

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """RGB thumbnail no larger than ``max_px`` on its long side, and its downsample from level 0."""
        handle = self._open()
        try:
            image = handle.get_thumbnail((max_px, max_px))
        except Exception as exc:
            raise SlideReadError(f"slide {self.slide_id}: cannot make a thumbnail of {self.path.name} "
                                 f"({type(exc).__name__}: {exc})") from exc
        rgb = np.asarray(image.convert("RGB"))
        return rgb, self.dimensions[0] / rgb.shape[1]


def read_scan_truth(path: Path, slide_id: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Centres float [n, 2], cell types and diagnostic flags from a ``<stem>.cells.csv`` truth file."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"x", "y"} - set(reader.fieldnames or ())
        if missing:
            raise MilhemaError(f"slide {slide_id}: {path} lacks the columns {', '.join(sorted(missing))}")
        xy, types, diag = [], [], []
        for row_number, row in enumerate(reader, start=2):
            try:
                xy.append((float(row["x"]), float(row["y"])))
            except ValueError:
                raise MilhemaError(f"slide {slide_id}: {path} row {row_number}: x/y must be numbers") from None
            types.append((row.get("cell_type") or "").strip())
            diag.append((row.get("diagnostic") or "0").strip().lower() in ("1", "true"))
    return np.array(xy, dtype=np.float64).reshape(-1, 2), types, np.array(diag, dtype=bool)

