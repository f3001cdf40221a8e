"""The bag file: one self-describing HDF5 file of cell features per slide (see DESIGN.md).

``write_bag`` writes to a temporary name in the same folder and renames it, so a crash never
leaves a half bag under the final name. ``read_bag`` also reads CLAM / TRIDENT feature files
(``features`` + ``coords`` and nothing else); their slide id is the file stem.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from milhema import __version__
from milhema.errors import BagError

FORMAT = "milhema-bag"
FORMAT_VERSION = 1
REQUIRED_DATASETS = ("features", "coords", "cell_ids")
OPTIONAL_DATASETS = ("bboxes", "thumbnails", "cell_types", "diagnostic")
REQUIRED_ATTRS = ("format", "format_version", "slide_id", "patient_id", "backbone", "weights_sha256",
                  "feature_dim", "mpp", "crop_px", "created_with")
_STR = h5py.string_dtype("utf-8")


@dataclass
class Bag:
    """The cells of one slide. Arrays share the first dimension N (number of cells).

    Attributes:
        features: float16/float32 ``[N, D]``.
        coords: float32 ``[N, 2]`` cell centre (x, y) in level-0 pixels; NaN without a slide.
        cell_ids: ``[N]`` str, crop file name or ``x_y``.
        bboxes: int32 ``[N, 4]`` (x0, y0, x1, y1) in level-0 pixels, or None.
        thumbnails: uint8 ``[N, S, S, 3]``, or None.
        cell_types: ``[N]`` str, or None.
        diagnostic: bool ``[N]``, or None.
        attrs: root attributes (for CLAM/TRIDENT files, whatever the file had).
        foreign: True for a CLAM/TRIDENT file without milhema attributes.
    """

    slide_id: str
    patient_id: str | None
    features: np.ndarray
    coords: np.ndarray
    cell_ids: np.ndarray
    bboxes: np.ndarray | None = None
    thumbnails: np.ndarray | None = None
    cell_types: np.ndarray | None = None
    diagnostic: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    foreign: bool = False

    @property
    def n_cells(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def backbone(self) -> str:
        return str(self.attrs.get("backbone", "unknown"))


def write_bag(
    path: str | Path,
    features: np.ndarray,
    *,
    slide_id: str,
    patient_id: str,
    coords: np.ndarray | None = None,
    cell_ids: Sequence[str] | np.ndarray | None = None,
    bboxes: np.ndarray | None = None,
    thumbnails: np.ndarray | None = None,
    cell_types: Sequence[str] | np.ndarray | None = None,
    diagnostic: np.ndarray | None = None,
    backbone: str = "unknown",
    weights_sha256: str = "none",
    mpp: float = math.nan,
    crop_px: int = 0,
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write one bag atomically and return its path.

    Args:
        features: ``[N, D]`` float array (float64 is stored as float32). N = 0 is allowed.
        coords: ``[N, 2]`` centres in level-0 pixels; default NaN (crops without a slide).
        cell_ids: ``[N]`` unique ids; default ``"0"`` ... ``"N-1"``.
        extra_attrs: additional root attributes (e.g. which feature blocks were concatenated).

    Raises:
        BagError: inconsistent shapes or non-finite features.
    """
    path = Path(path)
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise BagError(f"slide {slide_id}: features must be [N, D], got shape {feats.shape}")
    if feats.dtype not in (np.float16, np.float32):
        feats = feats.astype(np.float32)
    n = feats.shape[0]
    if n and not np.isfinite(feats).all():
        raise BagError(f"slide {slide_id}: features contain NaN or Inf; refusing to write {path.name}")
    datasets: dict[str, np.ndarray] = {
        "features": feats,
        "coords": _shaped(coords, (n, 2), np.float32, slide_id, "coords", fill=np.nan),
        "cell_ids": _strings(cell_ids if cell_ids is not None else [str(i) for i in range(n)], n, slide_id, "cell_ids"),
    }
    if len(set(datasets["cell_ids"].tolist())) != n:
        raise BagError(f"slide {slide_id}: cell_ids are not unique")
    if bboxes is not None:
        datasets["bboxes"] = _shaped(bboxes, (n, 4), np.int32, slide_id, "bboxes")
    if thumbnails is not None:
        thumbs = np.asarray(thumbnails)
        if thumbs.ndim != 4 or thumbs.shape[0] != n or thumbs.shape[3] != 3 or thumbs.shape[1] != thumbs.shape[2]:
            raise BagError(f"slide {slide_id}: thumbnails must be [N, S, S, 3], got {thumbs.shape}")
        datasets["thumbnails"] = thumbs.astype(np.uint8, copy=False)
    if cell_types is not None:
        datasets["cell_types"] = _strings(cell_types, n, slide_id, "cell_types")
    if diagnostic is not None:
        datasets["diagnostic"] = _shaped(diagnostic, (n,), np.bool_, slide_id, "diagnostic")
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "slide_id": slide_id,
        "patient_id": patient_id,
        "backbone": backbone,
        "weights_sha256": weights_sha256,
        "feature_dim": int(feats.shape[1]),
        "mpp": float(mpp),
        "crop_px": int(crop_px),
        "created_with": f"milhema {__version__}",
        **(extra_attrs or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            for name, array in datasets.items():
                _create(f, name, array)
            f.attrs.update(attrs)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # the rename must not reach disk before the data
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _create(f: h5py.File, name: str, array: np.ndarray) -> None:
    if array.dtype == object:
        f.create_dataset(name, data=array, dtype=_STR)
    elif name == "thumbnails" and array.shape[0] > 0:
        f.create_dataset(name, data=array, chunks=(min(64, array.shape[0]), *array.shape[1:]),
                         compression="gzip", compression_opts=4)
    else:
        f.create_dataset(name, data=array)


def _shaped(value: Any, shape: tuple[int, ...], dtype: type, slide_id: str, name: str,
            fill: float | None = None) -> np.ndarray:
    if value is None:
        if fill is None:
            raise BagError(f"slide {slide_id}: {name} is required")
        return np.full(shape, fill, dtype=dtype)
    array = np.asarray(value)
    if array.shape != shape:
        raise BagError(f"slide {slide_id}: {name} must have shape {list(shape)}, got {list(array.shape)}")
    return array.astype(dtype, copy=False)


def _strings(values: Sequence[str] | np.ndarray, n: int, slide_id: str, name: str) -> np.ndarray:
    array = np.array([str(v) for v in values], dtype=object)
    if array.shape != (n,):
        raise BagError(f"slide {slide_id}: {name} must have {n} entries, got {array.shape[0]}")
    return array


def read_bag(path: str | Path, *, thumbnails: bool = True) -> Bag:
    """Read a milhema bag or a CLAM/TRIDENT feature file.

    Args:
        thumbnails: load the thumbnails (the largest item; galleries need them, training does not).

    Raises:
        BagError: the file is missing, not HDF5, truncated, or does not follow the format.
    """
    path = Path(path)
    with _open(path) as f:
        return read_open_bag(f, path, thumbnails=thumbnails)


def open_bag(path: str | Path) -> h5py.File:
    """The bag file open for reading, for callers that keep handles open (one set per process).

    Raises:
        BagError: the file is missing or not HDF5.
    """
    return _open(Path(path))


def read_open_bag(f: h5py.File, path: Path, *, thumbnails: bool = True) -> Bag:
    """:func:`read_bag` on a file opened by :func:`open_bag`; ``path`` names the file in errors."""
    foreign = f.attrs.get("format") != FORMAT
    _check_structure(f, path, foreign)
    features = f["features"][()]
    if features.ndim == 3:  # CLAM writes [1, N, D] in some versions
        features = features[0]
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    coords = f["coords"][()]
    if coords.ndim == 3:
        coords = coords[0]
    bag = Bag(
        slide_id=str(attrs.get("slide_id", path.stem)),
        patient_id=None if foreign else str(attrs["patient_id"]),
        features=features,
        coords=coords.astype(np.float32, copy=False),
        cell_ids=(f["cell_ids"].asstr()[()].astype(object) if "cell_ids" in f
                  else np.array([f"{x:g}_{y:g}" for x, y in coords[:, :2]], dtype=object)),
        bboxes=f["bboxes"][()] if "bboxes" in f else None,
        thumbnails=f["thumbnails"][()] if thumbnails and "thumbnails" in f else None,
        cell_types=f["cell_types"].asstr()[()].astype(object) if "cell_types" in f else None,
        diagnostic=f["diagnostic"][()].astype(bool) if "diagnostic" in f else None,
        attrs=attrs,
        foreign=foreign,
    )
    if not np.isfinite(bag.features).all():
        raise BagError(f"slide {bag.slide_id}: bag file {path.name} has NaN or Inf features")
    return bag


def read_bag_attrs(path: str | Path) -> dict[str, Any]:
    """Root attributes plus ``n_cells`` without loading any array (cheap: for listings and checks)."""
    path = Path(path)
    with _open(path) as f:
        foreign = f.attrs.get("format") != FORMAT
        _check_structure(f, path, foreign)
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        shape = f["features"].shape
        attrs["n_cells"] = int(shape[-2])
        attrs.setdefault("feature_dim", int(shape[-1]))
        attrs.setdefault("slide_id", path.stem)
    return attrs


def validate_bag(path: str | Path) -> dict[str, Any]:
    """Fully check a bag file and return its attributes (with ``n_cells``).

    Reads every dataset once, so truncation or corruption anywhere is found.

    Raises:
        BagError: with the slide and what is wrong.
    """
    bag = read_bag(path)
    attrs = dict(bag.attrs)
    attrs["n_cells"] = bag.n_cells
    attrs.setdefault("slide_id", bag.slide_id)
    return attrs


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise BagError(f"bag file {path} not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise BagError(f"slide {path.stem}: bag file {path.name} is not a readable HDF5 file "
                       "(truncated or corrupt; re-run embed to rebuild it)") from exc


def _check_structure(f: h5py.File, path: Path, foreign: bool) -> None:
    slide = f.attrs.get("slide_id", path.stem)
    required = ("features", "coords") if foreign else REQUIRED_DATASETS
    for name in required:
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise BagError(f"slide {slide}: bag file {path.name} has no '{name}' dataset")
    if not foreign:
        missing = [a for a in REQUIRED_ATTRS if a not in f.attrs]
        if missing:
            raise BagError(f"slide {slide}: bag file {path.name} lacks attributes {', '.join(missing)}")
        version = int(f.attrs["format_version"])
        if version > FORMAT_VERSION:
            raise BagError(f"slide {slide}: bag format version {version} is newer than this milhema "
                           f"understands ({FORMAT_VERSION}); upgrade milhema")
    feats = f["features"]
    shape = feats.shape[1:] if feats.ndim == 3 and feats.shape[0] == 1 else feats.shape
    if len(shape) != 2:
        raise BagError(f"slide {slide}: features must be [N, D], got shape {list(feats.shape)}")
    if feats.dtype.kind != "f":
        raise BagError(f"slide {slide}: features must be floating point, got {feats.dtype}")
    n, d = shape
    if not foreign and int(f.attrs["feature_dim"]) != d:
        raise BagError(f"slide {slide}: attribute feature_dim={f.attrs['feature_dim']} but features have {d} columns")
    coords = f["coords"]
    cshape = coords.shape[1:] if coords.ndim == 3 and coords.shape[0] == 1 else coords.shape
    if len(cshape) != 2 or cshape[0] != n or cshape[1] < 2:
        raise BagError(f"slide {slide}: coords must be [{n}, 2], got {list(coords.shape)}")
    for name in ("cell_ids", *OPTIONAL_DATASETS):
        if name in f and f[name].shape[0] != n:
            raise BagError(f"slide {slide}: '{name}' has {f[name].shape[0]} rows but there are {n} cells")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value
