"""The benchmark tools' data writers (issue 18 items 9 and 14): what they write is a valid cohort."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from milhema.bags import read_bag
from milhema.config import load_config
from milhema.data import load_cohort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import bench_active  # noqa: E402
import bench_mil  # noqa: E402
import bench_realcells  # noqa: E402
import seed_table  # noqa: E402
import witness_cohort  # noqa: E402


def test_benchmark_csv_becomes_one_patient_per_bag(tmp_path: Path) -> None:
    rows = [[1, 7, 0.5, 1.0], [1, 7, 0.25, 2.0], [0, 9, -1.0, 3.0], [1, 11, 4.0, 4.0]]
    csv_path = tmp_path / "toy.csv"
    csv_path.write_text("\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    cohort_dir, bags = bench_mil.write_dataset(csv_path, tmp_path / "out")
    cohort = load_cohort(cohort_dir, list(bench_mil.CLASSES))
    assert cohort.patient_ids == ["B007", "B009", "B011"]
    assert cohort.labels(cohort.patient_ids).tolist() == [1, 0, 1]
    bag = read_bag(bags / "B007_S0.h5")
    np.testing.assert_allclose(bag.features, [[0.5, 1.0], [0.25, 2.0]])
    assert bag.patient_id == "B007"


def test_witness_cohort_plants_the_asked_fraction(tmp_path: Path) -> None:
    cohort_dir, bags = witness_cohort.write_cohort(tmp_path, seed=1, patients=4, fraction=0.01, cells=(300, 400),
                                                   shift=2.0, dim=6)
    cohort = load_cohort(cohort_dir, list(witness_cohort.CLASSES))
    for pid, label in zip(cohort.patient_ids, cohort.labels(cohort.patient_ids).tolist(), strict=True):
        bag = read_bag(bags / f"{pid}_S0.h5", thumbnails=False)
        assert bag.diagnostic is not None and 300 <= bag.n_cells <= 400
        witnesses = int(bag.diagnostic.sum())
        assert witnesses == (round(0.01 * bag.n_cells) if label == 1 else 0)
        if witnesses:
            assert bag.features[bag.diagnostic, :4].mean() > bag.features[~bag.diagnostic, :4].mean() + 1.0


def test_seed_table_cells_and_variants() -> None:
    assert seed_table.parse_variant("a=configs/x.yaml:train.lr=1e-3:data.max_cells=64") == (
        "a", Path("configs/x.yaml"), ["train.lr=1e-3", "data.max_cells=64"])
    assert seed_table.parse_variant("b=-:model.name=maxpool")[1] is None
    assert seed_table.cell([0.5, None, 0.7], "balanced accuracy") == "**0.600** (0.50, —, 0.70)"
    assert seed_table.cell([None], "c-index") == "—"


def test_realcells_dataset_links_the_images_in_place(tmp_path: Path) -> None:
    """Each source becomes class folders of symbolic links (never copies), dealt into groups by type."""
    from PIL import Image

    source = tmp_path / "data" / "tecom"
    source.mkdir(parents=True)
    labels = [1, 1, 2, 2, 3, 4, 1, 5, 2, 1]
    for i in range(1, len(labels) + 1):
        Image.new("RGB", (12, 12), (200, 100, 150)).save(source / f"{i:03d}.png")
        Image.new("L", (12, 12)).save(source / f"{i:03d}_mask.png")
    (source / "labels.csv").write_text("image ID,class label\n" + "".join(f"{i},{c}\n" for i, c in
                                                                         enumerate(labels, start=1)))
    cohort_dir, counts = bench_realcells.class_folders(tmp_path / "data", "tecom", tmp_path / "s", groups=3, seed=0)
    assert counts == {"neutrophil": 4, "lymphocyte": 3, "monocyte": 1, "eosinophil": 1, "basophil": 1}
    links = sorted((cohort_dir / "images").rglob("*.png"))
    assert len(links) == 10 and all(p.is_symlink() and "_mask" not in p.name for p in links)
    assert {p.parent.name for p in links if p.parent.parent.name == "G00"} >= {"neutrophil", "lymphocyte"}
    cohort = load_cohort(cohort_dir, ["AML"])
    assert [s.mpp for s in cohort.slides] == [0.16] * 3 and len(cohort.patients) == 3


def test_labels_to_reach_interpolates_in_log_labels() -> None:
    assert bench_active.labels_to_reach([50, 100, 200], [0.5, 0.6, 0.8], 0.7) == pytest.approx(100 * 2 ** 0.5)
    assert bench_active.labels_to_reach([50, 100], [0.9, 0.95], 0.8) == 50
    assert bench_active.labels_to_reach([50, 100], [0.5, 0.6], 0.8) == float("inf")


def test_seed_table_refuses_cohort_folders_of_the_same_name() -> None:
    assert seed_table.parse_data(["a/c1:a/b", "a/c2:a/b"]) == [(Path("a/c1"), Path("a/b")), (Path("a/c2"), Path("a/b"))]
    with pytest.raises(SystemExit, match="distinct names"):
        seed_table.parse_data(["w11/cohort:w11/bags", "w12/cohort:w12/bags"])


def test_generic_mil_preset_loads_with_the_benchmark_settings() -> None:
    preset = Path(__file__).resolve().parent.parent / "configs" / "mil_generic.yaml"
    settings = load_config(preset, bench_mil.BASE_SET)
    assert not settings.data.patient_features and settings.fusion.mode == "none"
    assert not settings.loss.class_weights   # accuracy is what the benchmark scores
    assert settings.train.val_fraction == 0 and settings.train.epochs == 100   # round 4's noval_e100
