"""Folders of photographed fields of view, one folder per slide (``kind = fields`` in slides.csv).

Many labs photograph fields through the microscope instead of scanning whole slides. Each image
of such a folder is searched for white cells by the same detectors as a scan: a
:class:`FieldImage` is a :class:`~milhema.slides.wsi.WholeSlide` of one level, read from a PNG,
JPEG, TIFF or BMP file, so detection, cropping and thumbnails take the scan code path unchanged.
Positions are pixels of the field the cell was found in.

Only the images directly in the folder are fields, in sorted name order; hidden files are
ignored, and the files detectors and truth read beside a field (``<stem>.geojson``,
``<stem>.csv``, ``<stem>.cells.csv``) are expected there. The microns per pixel come from
slides.csv (``mpp``): a camera image does not carry them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from milhema.errors import MilhemaError
from milhema.slides.crops import IMAGE_SUFFIXES
from milhema.slides.wsi import SlideReadError, WholeSlide

# Beside a field: external detections (.geojson, .csv) and annotations (.cells.csv); not fields.
_COMPANION_SUFFIXES = frozenset({".geojson", ".csv", ".json"})


@dataclass(frozen=True)
class FieldFolder:
    """The field images of one slide, sorted by file name; ``skipped`` names what else the folder holds."""

    slide_id: str
    folder: Path
    paths: tuple[Path, ...]
    skipped: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """File names of the fields (what the bag's ``fields`` attribute lists)."""
        return tuple(path.name for path in self.paths)


def list_fields(slide_id: str, folder: Path) -> FieldFolder:
    """The field images directly in ``folder``; subfolders and other files are listed in ``skipped``.

    Raises:
        MilhemaError: the folder does not exist.
    """
    if not folder.is_dir():
        raise MilhemaError(f"slide {slide_id}: fields folder {folder} does not exist")
    paths, skipped = [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(entry)
        elif not (entry.is_file() and entry.suffix.lower() in _COMPANION_SUFFIXES):
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
    return FieldFolder(slide_id, folder, tuple(paths), tuple(skipped))


class _ImageHandle:
    """The part of tiffslide's ``TiffSlide`` that :class:`WholeSlide` uses, over one decoded image."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        height, width = rgb.shape[:2]
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        self.properties: dict[str, Any] = {}   # a photograph carries no microns per pixel

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    as_array: bool = True) -> np.ndarray:
        (x, y), (width, height) = location, size
        return self.rgb[y:y + height, x:x + width]

    def get_thumbnail(self, size: tuple[int, int]) -> Image.Image:
        image = Image.fromarray(self.rgb)
        image.thumbnail(size)
        return image

    def close(self) -> None:
        self.rgb = np.zeros((0, 0, 3), np.uint8)


class FieldImage(WholeSlide):
    """One photographed field as a one-level slide (coordinates: pixels of the image).

    Args:
        slide_id: the slide the field belongs to (for error messages).
        path: the image file.
        mpp_override: µm per pixel from slides.csv; required, a photograph does not carry it.

    Raises:
        SlideReadError: on construction, when the file is not a readable image or no mpp is given.
    """

    def _open(self) -> Any:
        if self._handle is None:
            if not self.path.is_file():
                raise SlideReadError(f"slide {self.slide_id}: field {self.path} does not exist")
            self._handle = _ImageHandle(_decode(self.path, self._unreadable))
        return self._handle

    def _unreadable(self, exc: Exception) -> SlideReadError:
        return SlideReadError(f"slide {self.slide_id}: field {self.path.name} is not a readable image "
                              f"({type(exc).__name__}: {exc})")


def _decode(path: Path, unreadable: Callable[[Exception], SlideReadError]) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file (grey, RGBA and palette images converted)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise unreadable(exc) from exc
