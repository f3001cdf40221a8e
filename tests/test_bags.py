from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from milhema.bags import (
    FORMAT,
    CellPredictions,
    add_cell_predictions,
    read_bag,
    read_bag_attrs,
    validate_bag,
    write_bag,
)
from milhema.errors import BagError


def _bag(path: Path, n: int = 5, d: int = 8, **kw) -> Path:
    rng = np.random.default_rng(0)
    return write_bag(path, rng.normal(size=(n, d)).astype(np.float32), slide_id="S1", patient_id="P1", **kw)


def test_round_trip_keeps_every_dataset_and_attribute(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(4, 6)).astype(np.float16)
    coords = rng.uniform(0, 1000, size=(4, 2)).astype(np.float32)
    thumbs = rng.integers(0, 255, size=(4, 64, 64, 3), dtype=np.uint8)
    path = write_bag(tmp_path / "S1.h5", feats, slide_id="S1", patient_id="P1", coords=coords,
                     cell_ids=["a.png", "b.png", "c.png", "d.png"], bboxes=np.arange(16).reshape(4, 4),
                     thumbnails=thumbs, cell_types=["blast", "neutrophil", "blast", "lymphocyte"],
                     diagnostic=[True, False, True, False], backbone="timm/resnet18", weights_sha256="abc",
                     mpp=0.25, crop_px=96)
    bag = read_bag(path)
    assert bag.features.dtype == np.float16 and np.array_equal(bag.features, feats)
    assert np.array_equal(bag.coords, coords)
    assert list(bag.cell_ids) == ["a.png", "b.png", "c.png", "d.png"]
    assert bag.bboxes.dtype == np.int32 and bag.bboxes[3].tolist() == [12, 13, 14, 15]
    assert np.array_equal(bag.thumbnails, thumbs)
    assert list(bag.cell_types) == ["blast", "neutrophil", "blast", "lymphocyte"]
    assert bag.diagnostic.tolist() == [True, False, True, False]
    assert bag.slide_id == "S1" and bag.patient_id == "P1" and not bag.foreign
    attrs = read_bag_attrs(path)
    assert attrs["format"] == FORMAT and attrs["format_version"] == 1
    assert attrs["backbone"] == "timm/resnet18" and attrs["weights_sha256"] == "abc"
    assert attrs["feature_dim"] == 6 and attrs["n_cells"] == 4 and attrs["crop_px"] == 96
    assert attrs["mpp"] == pytest.approx(0.25) and attrs["created_with"].startswith("milhema")
    with h5py.File(path) as f:
        assert f["coords"].dtype == np.float32 and f["bboxes"].dtype == np.int32
        assert h5py.check_string_dtype(f["cell_ids"].dtype).encoding == "utf-8"


def test_fields_round_trip_and_bad_field_data(tmp_path: Path) -> None:
    path = _bag(tmp_path / "S1.h5", n=4, coords=np.full((4, 2), 10.0), cell_ids=["a:1_1", "a:2_2", "b:1_1", "c:1_1"],
                field=[0, 0, 1, 2], fields=["a.png", "b.jpg", "c.tif"])
    bag = read_bag(path)
    assert bag.field is not None and bag.field.tolist() == [0, 0, 1, 2] and bag.field_names == ("a.png", "b.jpg", "c.tif")
    assert read_bag(_bag(tmp_path / "S0.h5")).field is None   # scans and crops: no field, as before
    with pytest.raises(BagError, match="field and fields are given together"):
        _bag(tmp_path / "x.h5", n=4, field=[0, 0, 0, 0])
    with pytest.raises(BagError, match="field indices must be 0 to 0"):
        _bag(tmp_path / "x.h5", n=4, field=[0, 1, 0, 0], fields=["a.png"])
    with h5py.File(path, "a") as f:
        f["field"][3] = 7
    with pytest.raises(BagError, match=r"slide S1: bag file S1.h5: 'field' values must be 0 to 2 \(the 3 fields\)"):
        validate_bag(path)
    with h5py.File(path, "a") as f:
        del f.attrs["fields"]
    with pytest.raises(BagError, match="has a 'field' dataset but no 'fields' attribute"):
        read_bag(path)
    with h5py.File(path, "a") as f:
        del f["field"]
        f["field"] = np.array(["x"] * 4, dtype=h5py.string_dtype())
    with pytest.raises(BagError, match=r"'field' must be \[N\] integers"):
        read_bag_attrs(path)


def test_defaults_for_crops_without_a_slide(tmp_path: Path) -> None:
    bag = read_bag(_bag(tmp_path / "S1.h5", n=3))
    assert np.isnan(bag.coords).all() and bag.coords.shape == (3, 2)
    assert list(bag.cell_ids) == ["0", "1", "2"]
    assert bag.features.dtype == np.float32  # float64 input is stored as float32
    assert math.isnan(read_bag_attrs(tmp_path / "S1.h5")["mpp"])


def test_empty_bag_is_valid(tmp_path: Path) -> None:
    path = write_bag(tmp_path / "E.h5", np.zeros((0, 16), np.float16), slide_id="E", patient_id="P",
                     thumbnails=np.zeros((0, 64, 64, 3), np.uint8))
    attrs = validate_bag(path)
    assert attrs["n_cells"] == 0 and attrs["feature_dim"] == 16
    assert read_bag(path).features.shape == (0, 16)


def test_write_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    _bag(tmp_path / "S1.h5")
    with pytest.raises(BagError, match="cell_ids are not unique"):
        _bag(tmp_path / "S2.h5", n=2, cell_ids=["x", "x"])
    with pytest.raises(BagError, match="NaN or Inf"):
        write_bag(tmp_path / "S3.h5", np.array([[np.nan, 1.0]]), slide_id="S3", patient_id="P")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1.h5"]


def test_overwrite_replaces_whole_file(tmp_path: Path) -> None:
    _bag(tmp_path / "S1.h5", n=5)
    _bag(tmp_path / "S1.h5", n=2)
    assert read_bag(tmp_path / "S1.h5").n_cells == 2


@pytest.mark.parametrize("kw, message", [
    ({"coords": np.zeros((4, 2))}, "coords must have shape"),
    ({"bboxes": np.zeros((5, 3))}, "bboxes must have shape"),
    ({"thumbnails": np.zeros((5, 8, 9, 3))}, "thumbnails must be"),
    ({"cell_types": ["a"]}, "cell_types must have 5 entries"),
])
def test_write_refuses_inconsistent_shapes(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(BagError, match=message):
        _bag(tmp_path / "S1.h5", **kw)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    path = _bag(tmp_path / "S1.h5", n=50, d=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BagError, match="not a readable HDF5 file"):
        validate_bag(path)


def test_not_hdf5_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(BagError, match="slide x: bag file x.h5 is not a readable HDF5"):
        read_bag(tmp_path / "x.h5")
    with pytest.raises(BagError, match="not found"):
        read_bag(tmp_path / "missing.h5")


def test_missing_dataset_attribute_and_bad_values(tmp_path: Path) -> None:
    path = _bag(tmp_path / "S1.h5")
    with h5py.File(path, "a") as f:
        del f["cell_ids"]
    with pytest.raises(BagError, match="no 'cell_ids' dataset"):
        validate_bag(path)
    path = _bag(tmp_path / "S2.h5")
    with h5py.File(path, "a") as f:
        del f.attrs["backbone"]
    with pytest.raises(BagError, match="lacks attributes backbone"):
        validate_bag(path)
    path = _bag(tmp_path / "S3.h5")
    with h5py.File(path, "a") as f:
        f["features"][0, 0] = np.inf
    with pytest.raises(BagError, match="NaN or Inf"):
        validate_bag(path)
    path = _bag(tmp_path / "S4.h5")
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(BagError, match="newer than this milhema"):
        validate_bag(path)
    path = _bag(tmp_path / "S5.h5")
    with h5py.File(path, "a") as f:
        f.attrs["feature_dim"] = 3
    with pytest.raises(BagError, match="feature_dim=3"):
        validate_bag(path)


def test_clam_and_trident_files_read_as_bags(tmp_path: Path) -> None:
    feats = np.random.default_rng(2).normal(size=(7, 1024)).astype(np.float32)
    coords = np.arange(14).reshape(7, 2) * 256
    with h5py.File(tmp_path / "TCGA-01.h5", "w") as f:  # CLAM layout: [1, N, D] in some versions
        f["features"] = feats[None]
        f["coords"] = coords[None]
    bag = read_bag(tmp_path / "TCGA-01.h5")
    assert bag.foreign and bag.slide_id == "TCGA-01" and bag.patient_id is None
    assert bag.features.shape == (7, 1024) and bag.coords[1].tolist() == [512.0, 768.0]
    assert bag.cell_ids[1] == "512_768"
    with h5py.File(tmp_path / "slide2.h5", "w") as f:  # TRIDENT layout: [N, D]
        f["features"] = feats
        f["coords"] = coords
    assert validate_bag(tmp_path / "slide2.h5")["n_cells"] == 7


# --- format version 2: a cell classifier's predictions ---------------------------------------

def _predictions(n: int, seed: int = 0, attributes: bool = True) -> CellPredictions:
    rng = np.random.default_rng(seed)
    return CellPredictions(rng.dirichlet(np.ones(3), n).astype(np.float32), ("blast", "neutrophil", "lymphocyte"),
                           "ab" * 32, rng.uniform(0, 1, (n, 2)).astype(np.float32) if attributes else None,
                           ("vacuoles", "auer_rod") if attributes else (), '{"run": "r"}')


def test_a_bag_without_predictions_stays_version_1_and_annotations_round_trip(tmp_path: Path) -> None:
    labels = np.array([[1, 0], [0, -1], [0, 0], [1, 1], [-1, -1]])
    path = _bag(tmp_path / "S1.h5", attribute_labels=labels, attribute_names=["vacuoles", "auer_rod"])
    bag = read_bag(path)
    assert read_bag_attrs(path)["format_version"] == 1 and bag.predictions is None
    assert bag.attribute_labels.dtype == np.int8 and bag.attribute_labels.tolist() == labels.tolist()
    assert bag.attribute_label_names == ("vacuoles", "auer_rod")
    with pytest.raises(BagError, match="attribute_labels and attribute_names are given together"):
        _bag(tmp_path / "x.h5", attribute_labels=labels)
    with pytest.raises(BagError, match="must be 1, 0 or -1"):
        _bag(tmp_path / "x.h5", attribute_labels=labels * 2, attribute_names=["a", "b"])
    with pytest.raises(BagError, match=r"attribute_labels must have shape \[5, 3\]"):
        _bag(tmp_path / "x.h5", attribute_labels=labels, attribute_names=["a", "b", "c"])


def test_predictions_make_a_version_2_bag_that_reads_back(tmp_path: Path) -> None:
    pred = _predictions(5)
    path = _bag(tmp_path / "S1.h5", predictions=pred)
    bag = read_bag(path)
    assert read_bag_attrs(path)["format_version"] == 2
    assert np.allclose(bag.predictions.type_probs, pred.type_probs) and bag.predictions.type_names == pred.type_names
    assert np.allclose(bag.predictions.attribute_probs, pred.attribute_probs)
    assert bag.predictions.attribute_names == ("vacuoles", "auer_rod") and bag.predictions.classifier_sha256 == "ab" * 32
    with pytest.raises(BagError, match="rows must sum to 1"):
        _bag(tmp_path / "x.h5", predictions=CellPredictions(np.full((5, 3), 0.5), ("a", "b", "c"), "x"))
    with pytest.raises(BagError, match=r"probabilities in \[0, 1\]"):
        _bag(tmp_path / "x.h5", predictions=CellPredictions(pred.type_probs, pred.type_names, "x",
                                                             np.full((5, 1), 1.5), ("v",)))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda f: f.attrs.__setitem__("format_version", 1), "carries cell predictions but says format version 1"),
    (lambda f: f.attrs.__delitem__("cell_type_names"), "no 'cell_type_names' attribute listing 3 distinct names"),
    (lambda f: f.attrs.__setitem__("cell_type_names", '["a", "a", "b"]'), "3 distinct names"),
    (lambda f: f.attrs.__setitem__("cell_attribute_names", '["v"]'), "'cell_attributes' dataset of 2 columns"),
    (lambda f: f.attrs.__delitem__("cell_classifier_sha256"), "no 'cell_classifier_sha256' attribute"),
    (lambda f: f["cell_type_probs"].__setitem__((0, 0), 7.0), r"probabilities in \[0, 1\]"),
    (lambda f: f["cell_attributes"].__setitem__((1, 1), np.nan), r"probabilities in \[0, 1\]"),
    (lambda f: f.__delitem__("cell_type_probs"), "'cell_attributes' without 'cell_type_probs'"),
])
def test_damaged_predictions_are_refused_in_one_line(tmp_path: Path, edit, message: str) -> None:
    path = _bag(tmp_path / "S1.h5", predictions=_predictions(5))
    with h5py.File(path, "a") as f:
        edit(f)
    with pytest.raises(BagError, match=message) as info:
        validate_bag(path)
    assert "\n" not in str(info.value) and "S1.h5" in str(info.value)


def test_wrong_shapes_of_the_new_datasets_are_refused(tmp_path: Path) -> None:
    path = _bag(tmp_path / "S1.h5", predictions=_predictions(5))
    with h5py.File(path, "a") as f:
        del f["cell_type_probs"]
        f["cell_type_probs"] = np.full((4, 3), 1 / 3, np.float32)
    with pytest.raises(BagError, match="'cell_type_probs' has 4 rows but there are 5 cells"):
        validate_bag(path)
    path = _bag(tmp_path / "S2.h5", predictions=_predictions(5))
    with h5py.File(path, "a") as f:
        del f["cell_attributes"]
        f["cell_attributes"] = np.zeros(5, np.float32)
    with pytest.raises(BagError, match=r"'cell_attributes' must be \[N, K\] probabilities"):
        validate_bag(path)


def test_adding_predictions_keeps_everything_else_and_replaces_earlier_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    thumbs = rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    path = _bag(tmp_path / "S1.h5", thumbnails=thumbs, cell_types=["a"] * 5, extra_attrs={"embed_signature": "sig"})
    before = read_bag(path)
    add_cell_predictions(path, _predictions(5))
    after = read_bag(path)
    assert after.attrs["format_version"] == 2 and after.attrs["embed_signature"] == "sig"
    assert np.array_equal(after.features, before.features) and np.array_equal(after.thumbnails, thumbs)
    assert list(after.cell_types) == ["a"] * 5 and after.predictions.attribute_probs is not None
    add_cell_predictions(path, _predictions(5, seed=1, attributes=False))   # a classifier without anomaly head
    again = read_bag(path)
    assert again.predictions.attribute_probs is None and "cell_attribute_names" not in again.attrs
    assert np.allclose(again.predictions.type_probs, _predictions(5, seed=1).type_probs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1.h5"]
    with pytest.raises(BagError, match=r"cell_type_probs must have shape \[5, 3\], got \[4, 3\]"):
        add_cell_predictions(path, _predictions(4))


def test_adding_predictions_is_crash_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import milhema.bags as bags

    path = _bag(tmp_path / "S1.h5")
    original = path.read_bytes()
    real_create = bags._create

    def interrupted(f: h5py.File, name: str, array: np.ndarray) -> None:
        if name == "cell_type_probs":
            raise KeyboardInterrupt   # Ctrl-C (or a crash) half-way through the copy
        real_create(f, name, array)

    monkeypatch.setattr(bags, "_create", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add_cell_predictions(path, _predictions(5))
    assert path.read_bytes() == original and sorted(p.name for p in tmp_path.iterdir()) == ["S1.h5"]
    monkeypatch.setattr(bags, "_create", real_create)

    real_validate = bags.validate_bag

    def damaged_then_checked(p: Path) -> dict:
        data = Path(p).read_bytes()   # the disk garbles the copy before it is read back
        Path(p).write_bytes(data[: len(data) // 2])
        return real_validate(p)

    monkeypatch.setattr(bags, "validate_bag", damaged_then_checked)
    with pytest.raises(BagError, match="did not read back .* S1.h5 is left as it was"):
        add_cell_predictions(path, _predictions(5))
    assert path.read_bytes() == original and sorted(p.name for p in tmp_path.iterdir()) == ["S1.h5"]
    assert read_bag(path).predictions is None


def test_foreign_feature_files_get_no_predictions(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "T.h5", "w") as f:
        f["features"] = np.zeros((3, 4), np.float32)
        f["coords"] = np.zeros((3, 2))
    with pytest.raises(BagError, match="not written by milhema embed"):
        add_cell_predictions(tmp_path / "T.h5", _predictions(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T.h5"]
