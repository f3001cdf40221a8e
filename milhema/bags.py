"""The bag file: one self-describing HDF5 file of cell features per slide (see docs/FORMAT.md).

``write_bag`` writes to a temporary name in the same folder and renames it, so a crash never
leaves a half bag under the final name. ``read_bag`` also reads feature files made elsewhere:
CLAM / TRIDENT files (``features`` + ``coords``) and per-patient embeddings with ``features``
alone (DinoBloom's published embeddings); their slide id is the file stem, a cell without
``coords`` is named by its row.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from milhema.errors import BagError, first_line
from milhema.version import __version__

FORMAT = "milhema-bag"
# Raised only when a reader of the previous version would misread a file; an optional dataset or
# attribute that older readers skip (``field`` + ``fields``) keeps the version, so old milhema reads new bags.
# Version 2: the bag carries a cell classifier's predictions (``cell_type_probs``, ``cell_attributes``),
# results of a model that a version-1 reader would drop silently when the differential is a model input.
# A bag without them is written as version 1, so older milhema keeps reading it.
FORMAT_VERSION = 2
BASE_VERSION = 1
REQUIRED_DATASETS = ("features", "coords", "cell_ids")
PREDICTION_DATASETS = ("cell_type_probs", "cell_attributes")
OPTIONAL_DATASETS = ("bboxes", "thumbnails", "cell_types", "diagnostic", "field", "cell_attribute_labels",
                     *PREDICTION_DATASETS)
FIELDS_ATTR = "fields"   # JSON list of the field image names that ``field`` indexes
# JSON lists naming the columns of the [N, K] datasets, and what identifies the classifier.
LABEL_NAMES_ATTR = "cell_attribute_label_names"   # columns of cell_attribute_labels (annotations, -1/0/1)
TYPE_NAMES_ATTR = "cell_type_names"               # columns of cell_type_probs
ATTRIBUTE_NAMES_ATTR = "cell_attribute_names"     # columns of cell_attributes
CLASSIFIER_ATTR = "cell_classifier_sha256"        # SHA-256 of the classifier's weights
CLASSIFIER_INFO_ATTR = "cell_classifier"          # JSON text: the run and which of its models predicted the bag
PREDICTION_ATTRS = (TYPE_NAMES_ATTR, ATTRIBUTE_NAMES_ATTR, CLASSIFIER_ATTR, CLASSIFIER_INFO_ATTR)
_NAMES_OF = {"cell_attribute_labels": LABEL_NAMES_ATTR, "cell_type_probs": TYPE_NAMES_ATTR,
             "cell_attributes": ATTRIBUTE_NAMES_ATTR}
_PROB_TOLERANCE = 1e-3   # float32 probabilities: in [0, 1] and summing to 1 within this
REQUIRED_ATTRS = ("format", "format_version", "slide_id", "patient_id", "backbone", "weights_sha256",
                  "feature_dim", "mpp", "crop_px", "created_with")
_STR = h5py.string_dtype("utf-8")
# The HDF5 1.8 file format: every object header carries a checksum, so a damaged header is an
# error from the library instead of a crash inside it, and any HDF5 from 1.8 (2008) on reads it.
_LIBVER = ("v108", "v108")


@dataclass(frozen=True)
class CellPredictions:
    """A cell classifier's output for the N cells of one bag (``milhema cells predict``).

    Attributes:
        type_probs: float32 ``[N, T]`` calibrated probabilities over ``type_names`` (rows sum to 1).
        type_names: the T cell types.
        classifier_sha256: SHA-256 of the classifier's weights (its fingerprint).
        attribute_probs: float32 ``[N, A]`` probability of each of ``attribute_names`` (independent), or None.
        attribute_names: the A anomaly attributes, ``()`` without ``attribute_probs``.
        info: JSON text recorded beside them (the run, which of its models predicted this bag).
    """

    type_probs: np.ndarray
    type_names: tuple[str, ...]
    classifier_sha256: str
    attribute_probs: np.ndarray | None = None
    attribute_names: tuple[str, ...] = ()
    info: str = "{}"


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
        field: int32 ``[N]`` index into ``field_names`` of the photographed field each cell was found
            in (its ``coords`` and ``bboxes`` are pixels of that field), or None for scans and crops.
        field_names: the field image file names (the ``fields`` attribute), ``()`` without ``field``.
        attribute_labels: int8 ``[N, A]`` annotated anomaly attributes (1 present, 0 absent, -1 not
            annotated), or None; ``attribute_label_names`` names its columns.
        predictions: the cell classifier's probabilities (format version 2), or None.
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
    field: np.ndarray | None = None
    field_names: tuple[str, ...] = ()
    attribute_labels: np.ndarray | None = None
    attribute_label_names: tuple[str, ...] = ()
    predictions: CellPredictions | None = None
    attrs: dict[str, Any] = dataclass_field(default_factory=dict)
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
    field: np.ndarray | None = None,
    fields: Sequence[str] | None = None,
    attribute_labels: np.ndarray | None = None,
    attribute_names: Sequence[str] | None = None,
    predictions: CellPredictions | None = None,
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
        field, fields: for a folder of photographed fields, ``[N]`` index into ``fields`` (the field
            image names) of the field each cell is in; ``coords`` are then pixels of that field.
        attribute_labels, attribute_names: ``[N, A]`` annotated anomaly attributes (1, 0, -1 = not
            annotated) and their A names, together or not at all.
        predictions: a cell classifier's probabilities; the bag is then format version 2.
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
    field_attr = {}
    if (field is None) != (fields is None):
        raise BagError(f"slide {slide_id}: field and fields are given together or not at all")
    if field is not None and fields is not None:
        datasets["field"] = _shaped(field, (n,), np.int32, slide_id, "field")
        names = [str(name) for name in fields]
        if n and not (0 <= int(datasets["field"].min()) and int(datasets["field"].max()) < len(names)):
            raise BagError(f"slide {slide_id}: field indices must be 0 to {len(names) - 1}")
        field_attr = {FIELDS_ATTR: json.dumps(names)}
    if (attribute_labels is None) != (attribute_names is None):
        raise BagError(f"slide {slide_id}: attribute_labels and attribute_names are given together or not at all")
    if attribute_labels is not None and attribute_names is not None:
        names = _column_names(attribute_names, slide_id, "attribute_names")
        datasets["cell_attribute_labels"] = _shaped(attribute_labels, (n, len(names)), np.int8, slide_id,
                                                    "attribute_labels")
        if n and not np.isin(datasets["cell_attribute_labels"], (-1, 0, 1)).all():
            raise BagError(f"slide {slide_id}: attribute_labels must be 1, 0 or -1 (not annotated)")
        field_attr[LABEL_NAMES_ATTR] = json.dumps(names)
    if predictions is not None:
        prediction_arrays, prediction_attrs = _prediction_parts(predictions, n, slide_id)
        datasets |= prediction_arrays
        field_attr |= prediction_attrs
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if predictions is not None else BASE_VERSION,
        "slide_id": slide_id,
        "patient_id": patient_id,
        "backbone": backbone,
        "weights_sha256": weights_sha256,
        "feature_dim": int(feats.shape[1]),
        "mpp": float(mpp),
        "crop_px": int(crop_px),
        "created_with": f"milhema {__version__}",
        **field_attr,
        **(extra_attrs or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w", libver=_LIBVER) as f:
            for name, array in datasets.items():
                _create(f, name, array)
            f.attrs.update(attrs)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # the rename must not reach disk before the data
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _column_names(names: Sequence[str], slide_id: str, what: str) -> list[str]:
    listed = [str(name) for name in names]
    if not all(listed) or len(set(listed)) != len(listed):
        raise BagError(f"slide {slide_id}: {what} must be distinct non-empty names, got {listed}")
    return listed


def _prediction_parts(pred: CellPredictions, n: int, slide_id: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The datasets and attributes of ``pred``, checked against the bag's N cells."""
    types = _column_names(pred.type_names, slide_id, "cell type names")
    probs = _shaped(pred.type_probs, (n, len(types)), np.float32, slide_id, "cell_type_probs")
    arrays = {"cell_type_probs": probs}
    attrs = {TYPE_NAMES_ATTR: json.dumps(types), CLASSIFIER_ATTR: str(pred.classifier_sha256),
             CLASSIFIER_INFO_ATTR: str(pred.info)}
    if pred.attribute_probs is not None:
        names = _column_names(pred.attribute_names, slide_id, "cell attribute names")
        arrays["cell_attributes"] = _shaped(pred.attribute_probs, (n, len(names)), np.float32, slide_id,
                                            "cell_attributes")
        attrs[ATTRIBUTE_NAMES_ATTR] = json.dumps(names)
    for name, array in arrays.items():
        problem = _probability_problem(array, name)
        if problem:
            raise BagError(f"slide {slide_id}: {problem}")
    return arrays, attrs


def _probability_problem(array: np.ndarray, name: str) -> str | None:
    """What is wrong with a probability dataset's values, or None."""
    if not array.size:
        return None
    if not np.isfinite(array).all() or array.min() < -_PROB_TOLERANCE or array.max() > 1 + _PROB_TOLERANCE:
        return f"'{name}' must hold probabilities in [0, 1]"
    if name == "cell_type_probs" and np.abs(array.sum(axis=1, dtype=np.float64) - 1.0).max() > _PROB_TOLERANCE:
        return "'cell_type_probs' rows must sum to 1"
    return None


def add_cell_predictions(path: str | Path, predictions: CellPredictions) -> Path:
    """Add (or replace) a cell classifier's predictions in the bag at ``path``, atomically; return ``path``.

    The bag is copied, object by object, into a temporary file beside it with the new datasets and
    attributes (format version 2); the copy is flushed, read back in full by :func:`validate_bag`
    and only then renamed over the original. Interrupted or damaged at any point, the original is
    left as it was (and the temporary file removed), so a half-written bag never takes its name.
    Features are not recomputed: nothing is re-embedded.

    Raises:
        BagError: the bag is unreadable, not a milhema bag (a CLAM/TRIDENT file is someone else's),
            or the predictions do not fit its cells.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    slide_id = path.stem
    try:
        with _open(path) as src:
            if _is_foreign(src):
                raise BagError(f"slide {path.stem}: {path.name} is a feature file not written by milhema embed; cell "
                               "predictions are only added to milhema bags (embed the cohort to get them)")
            _check_structure(src, path, False)
            slide_id = _slide_name(src, path)
            arrays, new_attrs = _prediction_parts(predictions, int(src["features"].shape[0]), slide_id)
            with h5py.File(tmp, "w", libver=_LIBVER) as dst:
                _guarded(path, lambda: _copy_without_predictions(src, dst))
                for name, array in arrays.items():
                    _create(dst, name, array)
                dst.attrs.update(new_attrs)
                dst.attrs["format_version"] = FORMAT_VERSION
                dst.flush()
        try:
            validate_bag(tmp)   # every dataset of the copy reads back before it replaces the original
        except BagError as exc:
            raise BagError(f"slide {slide_id}: the copy of {path.name} with predictions did not read back "
                           f"({first_line(exc)}); {path.name} is left as it was") from exc
        shutil.copymode(path, tmp)   # the bag keeps its permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _copy_without_predictions(src: h5py.File, dst: h5py.File) -> None:
    """Every dataset and root attribute of ``src`` except earlier predictions (compression and chunks kept)."""
    for name in src:
        if name not in PREDICTION_DATASETS:
            src.copy(src[name], dst, name=name)
    for key, value in src.attrs.items():
        if key not in PREDICTION_ATTRS:
            dst.attrs[key] = value


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
        BagError: the file is missing, not HDF5 or damaged.
    """
    return _open(Path(path))


def read_open_bag(f: h5py.File, path: Path, *, thumbnails: bool = True, checked: bool = False) -> Bag:
    """:func:`read_bag` on a file opened by :func:`open_bag`; ``path`` names the file in errors.

    ``checked``: this process already checked the file's structure (:func:`read_bag_attrs` does,
    as training's ``inspect_bags`` reads every bag's attributes first), so it is not checked
    again; the values read (NaN features, cell predictions) still are.
    """
    foreign = _is_foreign(f)
    if not checked:
        _check_structure(f, path, foreign)
    bag = _guarded(path, lambda: _read(f, path, foreign, thumbnails))
    if not np.isfinite(bag.features).all():
        raise BagError(f"slide {bag.slide_id}: bag file {path.name} has NaN or Inf features; re-run embed to rebuild it")
    return bag


def _read(f: h5py.File, path: Path, foreign: bool, thumbnails: bool) -> Bag:
    features = f["features"][()]
    if features.ndim == 3:  # CLAM writes [1, N, D] in some versions
        features = features[0]
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    if "coords" in f:
        coords = f["coords"][()]
        coords = coords[0] if coords.ndim == 3 else coords
        positions = [f"{x:g}_{y:g}" for x, y in coords[:, :2]]
    else:  # per-patient embeddings published without positions: a cell is its row
        coords = np.full((len(features), 2), np.nan, np.float32)
        positions = [str(i) for i in range(len(features))]
    field: np.ndarray | None = None
    field_names: tuple[str, ...] = ()
    where = f"slide {_slide_name(f, path)}: bag file {path.name}"
    if "field" in f and not foreign:
        field, field_names = _fields(f["field"][()], attrs.get(FIELDS_ATTR), where)
    labels: np.ndarray | None = None
    label_names: tuple[str, ...] = ()
    if "cell_attribute_labels" in f and not foreign:
        labels = f["cell_attribute_labels"][()].astype(np.int8)
        label_names = _names(attrs, "cell_attribute_labels", labels.shape[1], where)
        if labels.size and not np.isin(labels, (-1, 0, 1)).all():
            raise BagError(f"{where}: 'cell_attribute_labels' must be 1, 0 or -1 (not annotated)")
    return Bag(
        slide_id=str(attrs.get("slide_id", path.stem)),
        patient_id=None if foreign else str(attrs["patient_id"]),
        features=features,
        coords=coords[:, :2].astype(np.float32, copy=False),
        cell_ids=_text(f, "cell_ids", path) if "cell_ids" in f else np.array(positions, dtype=object),
        bboxes=f["bboxes"][()] if "bboxes" in f else None,
        thumbnails=f["thumbnails"][()] if thumbnails and "thumbnails" in f else None,
        cell_types=_text(f, "cell_types", path) if "cell_types" in f else None,
        diagnostic=f["diagnostic"][()].astype(bool) if "diagnostic" in f else None,
        field=field,
        field_names=field_names,
        attribute_labels=labels,
        attribute_label_names=label_names,
        predictions=None if foreign else _predictions(f, attrs, where),
        attrs=attrs,
        foreign=foreign,
    )


def _names(attrs: dict[str, Any], dataset: str, k: int, where: str) -> tuple[str, ...]:
    """The JSON list of ``k`` distinct names of ``dataset``'s columns, from its attribute."""
    attr = _NAMES_OF[dataset]
    try:
        listed = json.loads(attrs[attr]) if isinstance(attrs.get(attr), str) else None
    except ValueError:
        listed = None
    if (not isinstance(listed, list) or len(listed) != k or not all(isinstance(x, str) and x for x in listed)
            or len(set(listed)) != k):
        raise BagError(f"{where} has a '{dataset}' dataset of {k} columns but no '{attr}' attribute listing "
                       f"{k} distinct names as JSON text")
    return tuple(listed)


def _predictions(f: h5py.File, attrs: dict[str, Any], where: str) -> CellPredictions | None:
    """The classifier's probabilities (format version 2), their values checked, or None."""
    if "cell_type_probs" not in f:
        if "cell_attributes" in f:
            raise BagError(f"{where} has 'cell_attributes' without 'cell_type_probs'; run milhema cells predict again")
        return None
    if int(attrs.get("format_version", 0)) < FORMAT_VERSION:
        raise BagError(f"{where} carries cell predictions but says format version {attrs.get('format_version')}; "
                       f"bags with predictions are version {FORMAT_VERSION} (run milhema cells predict again)")
    probs = f["cell_type_probs"][()].astype(np.float32)
    attributes = f["cell_attributes"][()].astype(np.float32) if "cell_attributes" in f else None
    for name, array in (("cell_type_probs", probs), ("cell_attributes", attributes)):
        problem = None if array is None else _probability_problem(array, name)
        if problem:
            raise BagError(f"{where}: {problem}")
    fingerprint = attrs.get(CLASSIFIER_ATTR)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise BagError(f"{where} has 'cell_type_probs' but no '{CLASSIFIER_ATTR}' attribute (the classifier)")
    return CellPredictions(probs, _names(attrs, "cell_type_probs", probs.shape[1], where), fingerprint,
                           attributes, () if attributes is None else
                           _names(attrs, "cell_attributes", attributes.shape[1], where),
                           str(attrs.get(CLASSIFIER_INFO_ATTR, "{}")))


def _fields(index: np.ndarray, names: Any, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """The ``field`` dataset checked against the ``fields`` attribute (a JSON list of names)."""
    try:
        listed = json.loads(names) if isinstance(names, str) else None
    except ValueError:
        listed = None
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise BagError(f"{where} has a 'field' dataset but no '{FIELDS_ATTR}' attribute listing the field images "
                       "as JSON text")
    index = index.astype(np.int64)
    if len(index) and (index.min() < 0 or index.max() >= len(listed)):
        raise BagError(f"{where}: 'field' values must be 0 to {len(listed) - 1} (the {len(listed)} fields)")
    return index.astype(np.int32), tuple(listed)


def _text(f: h5py.File, name: str, path: Path) -> np.ndarray:
    try:
        return f[name].asstr()[()].astype(object)
    except UnicodeDecodeError as exc:
        raise BagError(f"slide {_slide_name(f, path)}: '{name}' of bag file {path.name} is not UTF-8 text "
                       f"(byte {exc.start} of one entry)") from exc


def read_cell_predictions(path: str | Path) -> CellPredictions | None:
    """The cell classifier's predictions in a bag (checked as :func:`read_bag` checks them), or None,
    without reading its features or thumbnails.

    Raises:
        BagError: the file is unreadable or its predictions are malformed.
    """
    path = Path(path)
    with _open(path) as f:
        foreign = _is_foreign(f)
        _check_structure(f, path, foreign)
        if foreign:
            return None
        attrs = _guarded(path, lambda: {k: _plain(v) for k, v in f.attrs.items()})
        return _guarded(path, lambda: _predictions(f, attrs, f"slide {_slide_name(f, path)}: bag file {path.name}"))


def read_bag_attrs(path: str | Path) -> dict[str, Any]:
    """Root attributes plus ``n_cells`` without loading any array (cheap: for listings and checks)."""
    path = Path(path)
    with _open(path) as f:
        foreign = _is_foreign(f)
        _check_structure(f, path, foreign)
        attrs = _guarded(path, lambda: {k: _plain(v) for k, v in f.attrs.items()})
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


# What h5py raises when a damaged file passes the open but a block inside it cannot be read:
# OSError for HDF5 library errors, KeyError for broken links, RuntimeError for bad B-tree or
# heap entries, ValueError for impossible dataspaces or filters, TypeError for a string type
# with an unknown encoding.
_DAMAGED = (OSError, KeyError, RuntimeError, ValueError, TypeError)
T = TypeVar("T")


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise BagError(f"bag file {path} not found")
    damage = _global_heap_damage(path)
    if damage:
        raise BagError(f"slide {path.stem}: bag file {path.name} is corrupt ({damage}); re-run embed to rebuild it")
    try:
        return h5py.File(path, "r")
    except _DAMAGED as exc:
        raise BagError(f"slide {path.stem}: bag file {path.name} is not a readable HDF5 file "
                       "(truncated or corrupt; re-run embed to rebuild it)") from exc


# A global heap collection (where HDF5 keeps variable-length strings: cell ids, text attributes)
# starts with "GCOL", version 1 and three zero bytes, then its size; objects follow, each with a
# 16-byte header (index, reference count, reserved, size) and data padded to 8 bytes.
_GCOL = b"GCOL\x01\x00\x00\x00"
_GCOL_HEADER = 16
_GCOL_OBJECT_HEADER = 16


def _global_heap_damage(path: Path) -> str | None:
    """What is wrong with the file's global heap collections, or None.

    The HDF5 library loops forever on a collection whose free-space entry has size 0 (one
    flipped or zeroed byte does it), inside C code that no timeout can stop. Those collections
    are found here first, by walking every collection the way the library does.
    """
    if path.stat().st_size < len(_GCOL) + 8:
        return None
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(_GCOL)
        while start != -1:
            problem = _collection_damage(data, start)
            if problem:
                return f"global heap at byte {start}: {problem}"
            start = data.find(_GCOL, start + len(_GCOL))
    return None


def _collection_damage(data: mmap.mmap, start: int) -> str | None:
    if start + _GCOL_HEADER > len(data):
        return None  # cut short: as below
    (size,) = struct.unpack_from("<Q", data, start + 8)
    end = start + size
    if end > len(data):
        return None  # cut short: the library reports it when it reads the collection
    p = start + _GCOL_HEADER
    while p + _GCOL_OBJECT_HEADER <= end:  # a shorter tail is free space, which the library skips
        index, = struct.unpack_from("<H", data, p)
        (length,) = struct.unpack_from("<Q", data, p + 8)
        need = length if index == 0 else _GCOL_OBJECT_HEADER + (length + 7) // 8 * 8
        if need == 0 or p + need > end:
            return f"object {index} claims {length} bytes"
        p += need
    return None


def _guarded(path: Path, read: Callable[[], T]) -> T:
    """``read()``, with a damaged block reported as a :class:`BagError` that names the file."""
    try:
        return read()
    except BagError:
        raise
    except _DAMAGED as exc:
        raise BagError(f"slide {path.stem}: bag file {path.name} is damaged ({first_line(exc)}); "
                       "re-run embed to rebuild it") from exc


def _is_foreign(f: h5py.File) -> bool:
    """True for a CLAM/TRIDENT file: no ``format = milhema-bag`` attribute."""
    try:
        return _plain(f.attrs.get("format")) != FORMAT
    except _DAMAGED:
        return True  # unreadable attributes: judged on its datasets alone


def _slide_name(f: h5py.File, path: Path) -> str:
    """The slide id for messages: the attribute when it is readable text, else the file stem."""
    try:
        value = _plain(f.attrs.get("slide_id", path.stem))
    except _DAMAGED:
        return path.stem
    return value if isinstance(value, str) and value else path.stem


def _check_structure(f: h5py.File, path: Path, foreign: bool) -> None:
    """Every required dataset and attribute, with shapes and types the readers can rely on."""
    slide = _slide_name(f, path)
    where = f"slide {slide}: bag file {path.name}"
    _guarded(path, lambda: _check_datasets(f, where, foreign))
    if not foreign:
        _guarded(path, lambda: _check_attrs(f, where))


def _dataset(f: h5py.File, name: str, where: str) -> h5py.Dataset:
    item = f.get(name)
    if not isinstance(item, h5py.Dataset) or item.shape is None:
        raise BagError(f"{where} has no '{name}' dataset")
    return item


def _check_datasets(f: h5py.File, where: str, foreign: bool) -> None:
    required = ("features",) if foreign else REQUIRED_DATASETS
    for name in required:
        _dataset(f, name, where)
    feats = f["features"]
    shape = feats.shape[1:] if feats.ndim == 3 and feats.shape[0] == 1 else feats.shape
    if len(shape) != 2:
        raise BagError(f"{where}: features must be [N, D], got shape {list(feats.shape)}")
    if feats.dtype.kind != "f":
        raise BagError(f"{where}: features must be floating point, got {feats.dtype}")
    n, d = shape
    if d < 1:
        raise BagError(f"{where}: features have no columns (shape {list(feats.shape)})")
    if "coords" in f:  # a foreign file may have none (per-patient embeddings)
        coords = _dataset(f, "coords", where)
        cshape = coords.shape[1:] if coords.ndim == 3 and coords.shape[0] == 1 else coords.shape
        if len(cshape) != 2 or cshape[0] != n or cshape[1] < 2 or coords.dtype.kind not in "iuf":
            raise BagError(f"{where}: coords must be [{n}, 2] numbers, got {list(coords.shape)} {coords.dtype}")
    for name in ("cell_ids", *OPTIONAL_DATASETS):
        if name in f:
            _check_optional(_dataset(f, name, where), name, n, where)


# Per optional dataset: the dtype kinds allowed and the shape after N (None = any S, S).
_LAYOUT: dict[str, tuple[str, tuple[int | None, ...]]] = {
    "cell_ids": ("OSU", ()), "cell_types": ("OSU", ()), "diagnostic": ("biu", ()),
    "bboxes": ("iuf", (4,)), "thumbnails": ("u", (None, None, 3)), "field": ("iu", ()),
    "cell_attribute_labels": ("bi", (None,)), "cell_type_probs": ("f", (None,)), "cell_attributes": ("f", (None,)),
}
_WHAT = {"biu": "0/1", "iuf": "numbers", "u": "uint8", "iu": "integers", "bi": "1/0/-1 integers",
         "f": "probabilities (floating point)"}


def _check_optional(ds: h5py.Dataset, name: str, n: int, where: str) -> None:
    kinds, rest = _LAYOUT[name]
    shape_ok = ds.ndim == 1 + len(rest) and ds.shape[0] == n and all(
        want is None or want == got for want, got in zip(rest, ds.shape[1:], strict=True))
    if ds.ndim >= 1 and ds.shape[0] != n:
        raise BagError(f"{where}: '{name}' has {ds.shape[0]} rows but there are {n} cells")
    is_text = h5py.check_string_dtype(ds.dtype) is not None
    kind_ok = is_text if kinds == "OSU" else (ds.dtype.kind in kinds and not is_text)
    if not shape_ok or not kind_ok:
        layout = ", ".join(["N", *("K" if r is None and name in _NAMES_OF else "S" if r is None else str(r)
                                   for r in rest)])
        what = "text" if kinds == "OSU" else _WHAT[kinds]
        raise BagError(f"{where}: '{name}' must be [{layout}] {what}, got {list(ds.shape)} {ds.dtype}")


def _check_attrs(f: h5py.File, where: str) -> None:
    missing = [a for a in REQUIRED_ATTRS if a not in f.attrs]
    if missing:
        raise BagError(f"{where} lacks attributes {', '.join(missing)}")
    for name in ("slide_id", "patient_id", "backbone", "weights_sha256"):
        if not isinstance(_plain(f.attrs[name]), str):
            raise BagError(f"{where}: attribute {name} must be text, got {f.attrs[name]!r}")
    version = _int_attr(f, "format_version", where)
    if version > FORMAT_VERSION:
        raise BagError(f"{where}: bag format version {version} is newer than this milhema "
                       f"understands ({FORMAT_VERSION}); upgrade milhema")
    feats = f["features"]
    d = feats.shape[-1]
    feature_dim = _int_attr(f, "feature_dim", where)
    if feature_dim != d:
        raise BagError(f"{where}: attribute feature_dim={feature_dim} but features have {d} columns")
    _int_attr(f, "crop_px", where)
    mpp = _plain(f.attrs["mpp"])
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)):
        raise BagError(f"{where}: attribute mpp must be a number (NaN when unknown), got {mpp!r}")


def _int_attr(f: h5py.File, name: str, where: str) -> int:
    value = _plain(f.attrs[name])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise BagError(f"{where}: attribute {name} must be a whole number, got {value!r}")
    return int(value)



def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
