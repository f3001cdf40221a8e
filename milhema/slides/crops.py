"""Folders of single-cell crops, one folder per slide (CellaVision-style exports).

Images are read in sorted file-name order, so cell order and cell ids are stable. An optional
``cells.csv`` in the folder (``cell_id``, ``cell_type``, ``diagnostic``) carries annotations or
simulated truth; it is copied into the bag.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from milhema.errors import EmbedError, MilhemaError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
TRUTH_FILE = "cells.csv"


class CropReadError(MilhemaError):
    """One crop image cannot be decoded."""


@dataclass(frozen=True)
class CropFolder:
    """The crops of one slide: ``paths[i]`` has cell id ``paths[i].name``."""

    slide_id: str
    folder: Path
    paths: tuple[Path, ...]
    cell_types: tuple[str, ...] | None = None
    diagnostic: tuple[bool, ...] | None = None

    @property
    def cell_ids(self) -> list[str]:
        return [p.name for p in self.paths]


def list_crops(slide_id: str, folder: Path) -> CropFolder:
    """The image files of a crop folder, with their truth when ``cells.csv`` covers all of them."""
    if not folder.is_dir():
        raise MilhemaError(f"slide {slide_id}: crop folder {folder} does not exist")
    paths = tuple(sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                         key=lambda p: p.name))
    truth = read_truth(slide_id, folder / TRUTH_FILE)
    if truth is None or any(p.name not in truth for p in paths):
        return CropFolder(slide_id, folder, paths)
    return CropFolder(slide_id, folder, paths,
                      cell_types=tuple(truth[p.name][0] for p in paths),
                      diagnostic=tuple(truth[p.name][1] for p in paths))


def check_crop_folder(slide_id: str, folder: Path, n_images: int, strict: bool) -> None:
    """Warn about (or, when ``strict``, refuse) a crop folder without images or with files that are not images.

    Hidden files (``.DS_Store``) and the truth file ``cells.csv`` are expected beside crops and ignored.

    Raises:
        EmbedError: ``strict`` and the folder has no image or holds other files.
    """
    others = sorted(p.name for p in folder.iterdir()
                    if p.suffix.lower() not in IMAGE_SUFFIXES and p.name != TRUTH_FILE and not p.name.startswith("."))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        message = f"slide {slide_id}: {len(others)} file(s) in crop folder {folder} are not images ({shown})"
        if strict:
            raise EmbedError(f"{message}; remove them, or embed without --fail-on-bad-image to skip them")
        log.warning("%s; skipped", message)
    if strict and n_images == 0:
        raise EmbedError(f"slide {slide_id}: crop folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                         "remove the slide from slides.csv, or embed without --fail-on-bad-image to write an empty bag")


def read_truth(slide_id: str, path: Path) -> dict[str, tuple[str, bool]] | None:
    """``cell_id -> (cell_type, diagnostic)`` from a truth CSV, or None when there is none."""
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "cell_id" not in reader.fieldnames:
            raise MilhemaError(f"slide {slide_id}: {path.name} has no 'cell_id' column")
        truth = {}
        for row_number, row in enumerate(reader, start=2):
            flag = (row.get("diagnostic") or "0").strip().lower()
            if flag not in ("0", "1", "true", "false"):
                raise MilhemaError(f"slide {slide_id}: {path.name} row {row_number}: diagnostic {flag!r} "
                                   "must be 0 or 1")
            truth[row["cell_id"]] = ((row.get("cell_type") or "").strip(), flag in ("1", "true"))
    return truth


def read_crop(path: Path) -> np.ndarray:
    """An RGB uint8 ``[H, W, 3]`` image (grey and RGBA are converted).

    Raises:
        CropReadError: the file is not a decodable image.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CropReadError(f"{path.parent.name}/{path.name}: not a readable image ({exc})") from exc
