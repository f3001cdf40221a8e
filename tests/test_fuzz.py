"""Property-based tests of the three readers of user files: manifest, bag and config.

Whatever the input, each reader returns normally or raises a :class:`MilhemaError` subclass; any
other exception (or a crash, or a hang) is a bug. Inputs are random, or mutations of valid files.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milhema.bags import (
    ATTRIBUTE_NAMES_ATTR,
    CLASSIFIER_ATTR,
    FIELDS_ATTR,
    LABEL_NAMES_ATTR,
    OPTIONAL_DATASETS,
    REQUIRED_ATTRS,
    REQUIRED_DATASETS,
    TYPE_NAMES_ATTR,
    CellPredictions,
    read_bag,
    read_bag_attrs,
    validate_bag,
    write_bag,
)
from milhema.config import DEFAULTS, load_config
from milhema.data import load_cohort
from milhema.errors import MilhemaError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = ["AML", "MDS", "VEXAS", "reactive"]
CBC = ["wbc", "hb", "plt"]
PATIENTS = "patient_id,label,wbc,hb,plt,age,sex,time,event\nP1,AML,12.5,8.1,40,70,M,3.5,1\nP2,MDS,,9.9,110,75,F,,\n"
SLIDES = "slide_id,patient_id,source,view,mpp\nS1,P1,src,PB,0.25\nS2,P1,src,BM,\nS3,P2,src,PB,0.25\n"
# Each example is cheap; the budgets keep the whole file well under 40 s on two slow cores.
FAST = settings(max_examples=200, deadline=5000, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def _folder() -> Iterator[Path]:
    # Hypothesis runs many examples per test: a fresh folder each, not pytest's one tmp_path.
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def _only_milhema_errors(call: Callable[[], Any]) -> None:
    """The property: ``call`` returns, or raises one of milhema's own errors."""
    try:
        call()
    except MilhemaError as exc:
        assert str(exc).strip(), "an error must say what is wrong"


# --- manifest ---------------------------------------------------------------------------------

cell_text = st.one_of(st.sampled_from(["", " ", "P1", "AML", "aml", "nan", "inf", "-1", "1e400", "12,5", "../x",
                                       '"', "\x00", "\ufeff", "é", "src", "0"]),
                      st.text(max_size=12))


@st.composite
def mutated_csv(draw: st.DrawFn, text: str) -> bytes:
    """A valid CSV with rows, cells and header names deleted, duplicated or garbled, in some encoding."""
    rows = [line.split(",") for line in text.splitlines()]
    for _ in range(draw(st.integers(0, 5))):
        r = draw(st.integers(0, len(rows) - 1)) if rows else 0
        op = draw(st.sampled_from(["del_row", "dup_row", "del_cell", "dup_cell", "garble", "blank", "semicolon"]))
        if op == "del_row" and rows:
            del rows[r]
        elif op == "dup_row" and rows:
            rows.insert(r, list(rows[r]))
        elif op == "blank":
            rows.insert(r, [""])
        elif op == "semicolon" and rows:
            rows[r] = [";".join(rows[r])]
        elif rows and rows[r]:
            c = draw(st.integers(0, len(rows[r]) - 1))
            if op == "del_cell":
                del rows[r][c]
            elif op == "dup_cell":
                rows[r].insert(c, rows[r][c])
            else:
                rows[r][c] = draw(cell_text)
    body = draw(st.sampled_from(["\n", "\r\n", "\r"])).join(",".join(row) for row in rows)
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252"]))
    return body.encode(encoding, errors="replace")


def _load_manifest(patients: bytes, slides: bytes, check_sources: bool) -> None:
    with _folder() as root:
        (root / "src").mkdir()
        (root / "patients.csv").write_bytes(patients)
        (root / "slides.csv").write_bytes(slides)
        _only_milhema_errors(lambda: load_cohort(root, CLASSES, CBC, check_sources=check_sources))


@FAST
@given(patients=mutated_csv(PATIENTS), slides=mutated_csv(SLIDES), check_sources=st.booleans())
def test_manifest_mutations(patients: bytes, slides: bytes, check_sources: bool) -> None:
    _load_manifest(patients, slides, check_sources)


@FAST
@given(patients=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)),
       slides=st.one_of(st.just(SLIDES.encode()), st.binary(max_size=200)))
def test_manifest_random_bytes(patients: bytes, slides: bytes) -> None:
    _load_manifest(patients, slides, check_sources=True)


def test_valid_manifest_loads_unchanged() -> None:
    # The mutations start from a manifest that loads, so every failure above is caused by a mutation.
    with _folder() as root:
        (root / "src").mkdir()
        (root / "patients.csv").write_text(PATIENTS)
        (root / "slides.csv").write_text(SLIDES)
        cohort = load_cohort(root, CLASSES, CBC)
    assert cohort.patient_ids == ["P1", "P2"] and len(cohort.slides) == 3


# --- bag --------------------------------------------------------------------------------------

@functools.cache
def _valid_bag() -> bytes:
    """The bytes of a small bag with every optional dataset (a function, not a fixture, so that a
    failing example is reported without 50 kB of bytes)."""
    rng = np.random.default_rng(0)
    n = 6
    with _folder() as root:
        path = write_bag(root / "S1.h5", rng.normal(size=(n, 8)).astype(np.float16),
                         slide_id="S1", patient_id="P1", coords=rng.uniform(0, 100, (n, 2)),
                         cell_ids=[f"c{i}.png" for i in range(n)], bboxes=np.zeros((n, 4)),
                         thumbnails=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8), cell_types=["blast"] * n,
                         diagnostic=np.zeros(n, bool), field=np.arange(n) % 2, fields=["f0.png", "f1.jpg"],
                         attribute_labels=rng.integers(-1, 2, (n, 2)), attribute_names=["vacuoles", "auer_rod"],
                         predictions=CellPredictions(rng.dirichlet(np.ones(3), n).astype(np.float32),
                                                     ("blast", "neutrophil", "lymphocyte"), "f" * 64,
                                                     rng.uniform(0, 1, (n, 2)), ("vacuoles", "auer_rod")),
                         backbone="timm/resnet18", mpp=0.25, crop_px=64)
        assert read_bag(path).n_cells == n
        return path.read_bytes()


def _read_every_way(data: bytes) -> None:
    with _folder() as root:
        path = root / "S1.h5"
        path.write_bytes(data)
        for reader in (read_bag_attrs, validate_bag, lambda p: read_bag(p, thumbnails=False)):
            _only_milhema_errors(lambda reader=reader: reader(path))


@FAST
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_bags(cut: float) -> None:
    valid = _valid_bag()
    _read_every_way(valid[: int(len(valid) * cut)])


@FAST
@given(flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=12))
def test_byte_flipped_bags(flips: list[tuple[float, int]]) -> None:
    data = bytearray(_valid_bag())
    for where, byte in flips:
        data[int(where * len(data))] = byte
    _read_every_way(bytes(data))


@FAST
@given(start=st.floats(0.0, 1.0, exclude_max=True), length=st.integers(1, 4096))
def test_zeroed_blocks_in_bags(start: float, length: int) -> None:
    data = bytearray(_valid_bag())
    i = int(start * len(data))
    data[i:i + length] = bytes(len(data[i:i + length]))
    _read_every_way(bytes(data))


# Text h5py can store as a variable-length string: UTF-8, no NUL.
h5_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=10)
array_values = st.one_of(
    st.builds(lambda n, d, t: np.zeros((n, d), t), st.integers(0, 4), st.integers(0, 3),
              st.sampled_from([np.float16, np.float32, np.int32, np.uint8, np.bool_])),
    st.builds(lambda n, t: np.ones(n, t), st.integers(0, 5), st.sampled_from([np.float32, np.int64, np.bool_])),
    st.builds(lambda v: np.array(v), st.floats(allow_nan=True, allow_infinity=True)),
    st.lists(h5_text, max_size=5).map(lambda v: np.array(v, dtype=object)),
    st.just(np.zeros((1, 3, 2), np.float32)),
    st.just(np.full((3, 2), np.nan, np.float32)),
    st.sampled_from([0.5, 2.0, -1.0]).map(lambda v: np.full((3, 2), v, np.float32)),   # probabilities, or not
    st.sampled_from([-1, 1, 5]).map(lambda v: np.full((3, 2), v, np.int8)),             # attribute labels, or not
)
attr_values = st.one_of(h5_text, st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                        st.booleans(), st.binary(max_size=6).map(np.bytes_), st.just("milhema-bag"),
                        st.lists(st.integers(0, 9), min_size=1, max_size=3).map(np.array))


@FAST
@given(datasets=st.dictionaries(st.sampled_from([*REQUIRED_DATASETS, *OPTIONAL_DATASETS, "extra"]), array_values),
       attrs=st.dictionaries(st.sampled_from([*REQUIRED_ATTRS, FIELDS_ATTR, LABEL_NAMES_ATTR, TYPE_NAMES_ATTR,
                                              ATTRIBUTE_NAMES_ATTR, CLASSIFIER_ATTR, "extra"]),
                             attr_values | st.sampled_from(['["a.png"]', '["a", 1]', "[]", "{", '["a", "b"]'])))
def test_random_hdf5_files(datasets: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    with _folder() as root:
        path = root / "S1.h5"
        with h5py.File(path, "w") as f:
            for name, value in datasets.items():
                if value.dtype == object:
                    f.create_dataset(name, data=value, dtype=h5py.string_dtype())
                else:
                    f.create_dataset(name, data=value)
            for name, value in attrs.items():
                f.attrs[name] = value
        _read_every_way(path.read_bytes())


# --- config -----------------------------------------------------------------------------------

KEYS = [(section, key) for section, values in DEFAULTS.items() for key in values]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["1e-3", ".inf", "2024-13-01", "[", "abmil", "AML"]))
yaml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)


def _load_config_text(text: str) -> None:
    with _folder() as root:
        path = root / "c.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))  # lone surrogates: bytes that are not UTF-8
        _only_milhema_errors(lambda: load_config(path))


@FAST
@given(document=st.dictionaries(st.one_of(st.sampled_from(list(DEFAULTS)), st.text(max_size=6)), yaml_values,
                                max_size=4))
def test_random_yaml_documents(document: dict[str, Any]) -> None:
    _load_config_text(yaml.safe_dump(document))


@FAST
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(["set", "typo", "delete", "section"]),
                                  yaml_values), min_size=1, max_size=4))
def test_mutated_abmil_config(changes: list[tuple[tuple[str, str], str, Any]]) -> None:
    config = yaml.safe_load((CONFIGS / "abmil.yaml").read_text())
    for (section, key), op, value in changes:
        part = config.setdefault(section, {})
        if not isinstance(part, dict):
            continue
        if op == "set":
            part[key] = value
        elif op == "typo":
            part[key[:-1] or "x"] = value
        elif op == "delete":
            part.pop(key, None)
        else:
            config[section] = value
    _load_config_text(yaml.safe_dump(config))


@FAST
@given(edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.text(max_size=3)), min_size=1, max_size=6))
def test_garbled_config_text(edits: list[tuple[float, str]]) -> None:
    text = (CONFIGS / "abmil.yaml").read_text()
    for where, replacement in edits:
        i = int(where * len(text))
        text = text[:i] + replacement + text[i + 1:]
    _load_config_text(text)


@FAST
@given(key=st.one_of(st.sampled_from([f"{s}.{k}" for s, k in KEYS]), st.text(max_size=10)),
       value=st.one_of(scalars.map(str), st.text(max_size=10)))
def test_random_overrides(key: str, value: str) -> None:
    _only_milhema_errors(lambda: load_config(None, [f"{key}={value}"]))


def test_extreme_values_are_refused_with_the_key() -> None:
    for override in ("train.lr=.nan", "train.weight_decay=.inf", "train.epochs=1e30e", "train.seed=-5",
                     "cv.repeats=0", "data.max_cells=-1"):
        key = override.split("=")[0]
        with pytest.raises(MilhemaError, match=key.replace(".", r"\.")):
            load_config(None, [override])
    assert math.isclose(load_config(None, ["train.lr=1e-3"]).train.lr, 1e-3)
