"""Folders of single-cell crops, one folder per slide (CellaVision-style exports).

A slide's folder holds its crops directly, or sorted into one subfolder per cell type
(``Blast/001.jpg``, ``Neutrophil segmented/002.jpg``), or both. Only that one level of
subfolders is read: files further down are skipped and reported, because an export never
nests cell-type folders, so anything deeper is something else (an old export, a backup).
Hidden files and folders (``.DS_Store``, ``.thumbnails/``) are ignored.

A cell's id is its image's path relative to the slide folder with ``/`` separators
(``Blast/001.jpg``; a top-level crop's id is its file name), unique within the slide and
stable, and cells are read in sorted id order. A cell in a subfolder has the subfolder's name
as its cell type. An optional ``cells.csv`` in the slide folder (``cell_id``, ``cell_type``,
``diagnostic``) carries annotations or simulated truth: its ``cell_type``, when given, wins over
the folder's name; any other column whose values are all 0/1 (``true``/``false``; empty = not
annotated) is an anomaly attribute of the cells (``vacuoles``, ``auer_rod`` ...). Ids are only ever matched and stored as text, never turned back into paths.
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
# Compared lower-cased: exports write .JPG and .TIF as often as .jpg.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
TRUTH_FILE = "cells.csv"
TRUTH_COLUMNS = frozenset({"cell_id", "cell_type", "diagnostic"})   # of cells.csv; other 0/1 columns are attributes
_YES, _NO = frozenset({"1", "true"}), frozenset({"0", "false"})
SHOWN = 3   # names quoted in a warning; the rest are counted


class CropReadError(MilhemaError):
    """One crop image cannot be decoded."""


@dataclass(frozen=True)
class CropFolder:
    """The crops of one slide: ``paths[i]`` has cell id ``ids[i]`` (its path relative to ``folder``).

    ``cell_types`` is None when neither subfolders nor ``cells.csv`` give any type ("" marks a
    cell without one); ``diagnostic`` only when ``cells.csv`` has the column and a row for every
    image, since a bag holds it for all cells or none. The other fields are what was found but
    not embedded, as paths relative to ``folder`` (or cells.csv ids), for the warnings.
    """

    slide_id: str
    folder: Path
    paths: tuple[Path, ...]
    ids: tuple[str, ...]
    cell_types: tuple[str, ...] | None = None
    diagnostic: tuple[bool, ...] | None = None
    not_images: tuple[str, ...] = ()      # files that are not images (by suffix)
    too_deep: tuple[str, ...] = ()        # files below a cell-type folder's own subfolders
    not_in_truth: tuple[str, ...] = ()    # images cells.csv has no row for
    truth_orphans: tuple[str, ...] = ()   # cells.csv ids that are no image of the folder
    truth_has_diagnostic: bool = False
    attribute_names: tuple[str, ...] = ()                   # the 0/1 attribute columns of cells.csv
    attribute_labels: tuple[tuple[int, ...], ...] | None = None   # per image: 1, 0, -1 (not annotated)

    @property
    def cell_ids(self) -> list[str]:
        return list(self.ids)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _walk(folder: Path) -> tuple[list[tuple[str, Path, str]], list[str], list[str]]:
    """``(cell id, path, folder's cell type)`` of every image, files that are not images, files too deep."""
    images: list[tuple[str, Path, str]] = []
    not_images: list[str] = []
    too_deep: list[str] = []
    for entry in folder.iterdir():
        if _hidden(entry) or entry.name == TRUTH_FILE:
            continue
        if not entry.is_dir():
            if _is_image(entry):
                images.append((entry.name, entry, ""))
            else:
                not_images.append(entry.name)
            continue
        for inner in entry.iterdir():
            rel = f"{entry.name}/{inner.name}"
            if _hidden(inner):
                continue
            if inner.is_dir():
                # rglob does not follow symbolic links into folders, so a link loop cannot hang this.
                too_deep += [f"{rel}/{p.relative_to(inner).as_posix()}" for p in inner.rglob("*")
                             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(inner).parts)]
            elif _is_image(inner):
                images.append((rel, inner, entry.name))
            else:
                not_images.append(rel)
    # Sorted by id as text (code points, not the locale): the same order on every machine.
    images.sort(key=lambda item: item[0])
    return images, sorted(not_images), sorted(too_deep)


def list_crops(slide_id: str, folder: Path) -> CropFolder:
    """The images of a crop folder and of its cell-type subfolders, with their annotations.

    Raises:
        MilhemaError: the folder does not exist, or its cells.csv cannot be read.
    """
    if not folder.is_dir():
        raise MilhemaError(f"slide {slide_id}: crop folder {folder} does not exist")
    images, not_images, too_deep = _walk(folder)
    ids = tuple(cell_id for cell_id, _, _ in images)
    paths = tuple(path for _, path, _ in images)
    folder_types = [cell_type for _, _, cell_type in images]
    truth = read_truth(slide_id, folder / TRUTH_FILE)
    if truth is None:
        return CropFolder(slide_id, folder, paths, ids, tuple(folder_types) if any(folder_types) else None,
                          not_images=tuple(not_images), too_deep=tuple(too_deep))
    not_in_truth = tuple(cell_id for cell_id in ids if cell_id not in truth)
    # A row's own type wins over its folder's name; an image without a row keeps its folder's (or none).
    cell_types = tuple((truth[cell_id][0] if cell_id in truth else "") or folder_type
                       for cell_id, folder_type in zip(ids, folder_types, strict=True))
    has_diagnostic = any(flag is not None for _, flag in truth.values())
    # Unknown flags are not "not diagnostic": with one image unannotated, the slide carries none.
    diagnostic = (tuple(bool(truth[cell_id][1]) for cell_id in ids)
                  if has_diagnostic and not not_in_truth else None)
    names, rows = read_attribute_columns(slide_id, folder / TRUTH_FILE, TRUTH_COLUMNS)
    by_id = {row["cell_id"]: values for row, values in rows}
    unknown = (-1,) * len(names)
    labels = tuple(by_id.get(cell_id, unknown) for cell_id in ids) if names else None
    return CropFolder(slide_id, folder, paths, ids, cell_types, diagnostic, tuple(not_images), tuple(too_deep),
                      not_in_truth, tuple(sorted(set(truth) - set(ids))), has_diagnostic, names, labels)


def _listed(names: tuple[str, ...]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


def check_crop_folder(crops: CropFolder, strict: bool) -> None:
    """Warn about what a crop folder holds besides usable crops, or, when ``strict``, refuse it.

    Files that are not images and files nested too deep are skipped (refused when ``strict``);
    images without a cells.csv row and cells.csv rows without an image are reported either way,
    as they cost annotations, not cells. Hidden files and ``cells.csv`` itself are expected.

    Raises:
        EmbedError: ``strict``, and the folder holds no image, or files that are not images, or
            files below a cell-type folder's subfolders.
    """
    slide_id, folder = crops.slide_id, crops.folder
    if crops.not_images:
        message = (f"slide {slide_id}: {len(crops.not_images)} file(s) in crop folder {folder} are not images "
                   f"({_listed(crops.not_images)})")
        if strict:
            raise EmbedError(f"{message}; remove them, or embed without --fail-on-bad-image to skip them")
        log.warning("%s; skipped", message)
    if crops.too_deep:
        message = (f"slide {slide_id}: {len(crops.too_deep)} file(s) in crop folder {folder} are more than one "
                   f"folder deep ({_listed(crops.too_deep)}); only <cell type>/<image> is read")
        if strict:
            raise EmbedError(f"{message}; move them up, or embed without --fail-on-bad-image to skip them")
        log.warning("%s; skipped", message)
    if strict and not crops.paths:
        raise EmbedError(f"slide {slide_id}: crop folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                         "remove the slide from slides.csv, or embed without --fail-on-bad-image to write an empty bag")
    if crops.not_in_truth:
        in_folders = sum("/" in cell_id for cell_id in crops.not_in_truth)
        typed = ("no cell type" if not in_folders else "their folder's name as cell type"
                 + ("" if in_folders == len(crops.not_in_truth) else ", or none at the top level"))
        dropped = "; the slide's diagnostic flags are dropped" if crops.truth_has_diagnostic else ""
        log.warning("slide %s: %s has no row for %d of %d images (%s); they are embedded with %s%s", slide_id,
                    TRUTH_FILE, len(crops.not_in_truth), len(crops.paths), _listed(crops.not_in_truth), typed,
                    dropped)
    if crops.truth_orphans:
        log.warning("slide %s: %d row(s) of %s name no image in crop folder %s (%s); ignored", slide_id,
                    len(crops.truth_orphans), TRUTH_FILE, folder, _listed(crops.truth_orphans))


def read_truth(slide_id: str, path: Path) -> dict[str, tuple[str, bool | None]] | None:
    """``cell_id -> (cell_type, diagnostic)`` from a truth CSV, or None when there is none.

    ``diagnostic`` is None when the file has no ``diagnostic`` column: an export with cell types
    only says nothing about which cells carry the diagnosis.
    """
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "cell_id" not in reader.fieldnames:
            raise MilhemaError(f"slide {slide_id}: {path.name} has no 'cell_id' column")
        with_flags = "diagnostic" in reader.fieldnames
        truth: dict[str, tuple[str, bool | None]] = {}
        for row_number, row in enumerate(reader, start=2):
            flag = (row.get("diagnostic") or "0").strip().lower()
            if flag not in ("0", "1", "true", "false"):
                raise MilhemaError(f"slide {slide_id}: {path.name} row {row_number}: diagnostic {flag!r} "
                                   "must be 0 or 1")
            truth[row["cell_id"]] = ((row.get("cell_type") or "").strip(), flag in ("1", "true") if with_flags else None)
    return truth


def read_attribute_columns(slide_id: str, path: Path, known: frozenset[str],
                           ) -> tuple[tuple[str, ...], list[tuple[dict[str, str], tuple[int, ...]]]]:
    """The anomaly-attribute columns of a truth CSV and, per row in file order, the row and its values.

    An attribute column is any column besides ``known`` whose values are all 0/1 (``true``/``false``,
    any case); an empty value is -1 (not annotated). Other columns (scores, comments) are not
    attributes and are left out, logged once each. Returns ``((), [])`` when there is no file.
    """
    if not path.is_file():
        return (), []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [c for c in (reader.fieldnames or []) if c and c.strip() not in known]
        rows = list(reader)
    names: list[str] = []
    for column in header:
        values = {(row.get(column) or "").strip().lower() for row in rows} - {""}
        if values <= _YES | _NO and column.strip() not in names:
            names.append(column)
        elif values:
            log.info("slide %s: column %r of %s is not 0/1 (%r ...): not an anomaly attribute", slide_id, column,
                     path.name, sorted(values - _YES - _NO)[0])
    out = []
    for row in rows:
        cells = [(row.get(column) or "").strip().lower() for column in names]
        out.append((row, tuple(1 if v in _YES else 0 if v in _NO else -1 for v in cells)))
    return tuple(c.strip() for c in names), out


def read_crop(path: Path, name: str = "") -> np.ndarray:
    """An RGB uint8 ``[H, W, 3]`` image (grey and RGBA are converted); ``name`` says which in errors.

    Raises:
        CropReadError: the file is not a decodable image.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CropReadError(f"{name or f'{path.parent.name}/{path.name}'}: not a readable image ({exc})") from exc
