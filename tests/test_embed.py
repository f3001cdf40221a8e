from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from milhema.bags import read_bag, validate_bag
from milhema.config import DEFAULTS
from milhema.data import load_cohort
from milhema.embed.backbone import RandomWeightsWarning, file_sha256, load_backbone
from milhema.embed.morphology import MORPHOLOGY_FEATURES, morphology_features
from milhema.embed.pipeline import EmbedOptions, embed_cohort, parse_shard
from milhema.errors import EmbedError, MilhemaError
from milhema.synth.crop import render_crop
from milhema.synth.stain import Stain

CLASSES = DEFAULTS["data"]["classes"]
FAST = {"backbone": "timm/resnet18", "pretrained": False, "input_size": 64, "workers": 0, "progress": False,
        "batch_size": 32}


@pytest.fixture()
def cohort(tiny_cohort: Path, tmp_path: Path):
    copy = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, copy)
    return load_cohort(copy, CLASSES)


@pytest.fixture(scope="module")
def embedded(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    cohort = load_cohort(tiny_cohort, CLASSES)
    out = tmp_path_factory.mktemp("bags")
    with pytest.warns(RandomWeightsWarning):
        report = embed_cohort(cohort, out, EmbedOptions(**{**FAST, "morphology": True, "workers": 2}))
    return cohort, out, report


def test_embedding_writes_one_valid_bag_per_slide(embedded) -> None:
    cohort, out, report = embedded
    assert sorted(report.written) == sorted(s.slide_id for s in cohort.slides)
    assert report.cells == sum(len(list(s.source.glob("*.png"))) for s in cohort.slides) > 0
    for slide in cohort.slides:
        attrs = validate_bag(out / f"{slide.slide_id}.h5")
        bag = read_bag(out / f"{slide.slide_id}.h5")
        pngs = sorted(p.name for p in slide.source.glob("*.png"))
        assert list(bag.cell_ids) == pngs and bag.n_cells == attrs["n_cells"] == len(pngs)
        assert bag.feature_dim == 512 + len(MORPHOLOGY_FEATURES) and bag.features.dtype == np.float16
        assert np.isfinite(bag.features).all() and bag.features[:, :512].std() > 0
        assert bag.thumbnails.shape == (len(pngs), 64, 64, 3) and bag.thumbnails.mean() > 50
        assert bag.patient_id == slide.patient_id and bag.backbone == "timm/resnet18"
        assert attrs["weights_sha256"] == "none" and attrs["mpp"] == pytest.approx(slide.mpp)
        assert attrs["crop_px"] == 64 and len(bag.cell_types) == len(pngs) and bag.diagnostic.dtype == bool
        # The simulator's anomaly attributes (0/1 columns of cells.csv) are carried as annotations.
        with open(slide.source / "cells.csv", encoding="utf-8") as fh:
            truth = {row["cell_id"]: row for row in csv.DictReader(fh)}
        names = bag.attribute_label_names
        assert names == ("vacuoles", "hypogranular", "pseudo_pelger", "auer_rod") and attrs["format_version"] == 1
        assert bag.attribute_labels.tolist() == [[int(truth[c][a]) for a in names] for c in bag.cell_ids]


def test_features_do_not_depend_on_batching_or_workers(embedded, tmp_path: Path) -> None:
    cohort, out, _ = embedded
    first = cohort.slides[0]
    embed_cohort(cohort, tmp_path, EmbedOptions(**{**FAST, "morphology": True, "batch_size": 7, "workers": 0}))
    a = read_bag(out / f"{first.slide_id}.h5").features.astype(np.float32)
    b = read_bag(tmp_path / f"{first.slide_id}.h5").features.astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)


def test_resume_skips_finished_and_redoes_truncated_bags(cohort, tmp_path: Path) -> None:
    opts = EmbedOptions(**FAST)
    embed_cohort(cohort, tmp_path, opts)
    bags = {s.slide_id: tmp_path / f"{s.slide_id}.h5" for s in cohort.slides}
    stamps = {k: p.stat().st_mtime_ns for k, p in bags.items()}
    victim = cohort.slides[1].slide_id
    data = bags[victim].read_bytes()
    bags[victim].write_bytes(data[: len(data) // 3])
    (tmp_path / f".{victim}.h5.abc123.tmp").write_bytes(b"partial")  # left by a killed run
    report = embed_cohort(cohort, tmp_path, opts)
    assert report.written == [victim]
    assert sorted(report.skipped) == sorted(k for k in bags if k != victim)
    assert validate_bag(bags[victim])["n_cells"] > 0
    assert all(bags[k].stat().st_mtime_ns == stamps[k] for k in bags if k != victim)
    assert not list(tmp_path.glob(".*.tmp"))
    report = embed_cohort(cohort, tmp_path, EmbedOptions(**{**FAST, "overwrite": True}))
    assert len(report.written) == len(bags)


def test_other_settings_never_mix_into_a_finished_folder(cohort, tmp_path: Path) -> None:
    embed_cohort(cohort, tmp_path, EmbedOptions(**FAST))
    with pytest.raises(EmbedError, match="embedded with other settings"):
        embed_cohort(cohort, tmp_path, EmbedOptions(**{**FAST, "input_size": 48}))


def test_shards_partition_the_slides(cohort, tmp_path: Path) -> None:
    done = []
    for i in range(3):
        done += embed_cohort(cohort, tmp_path, EmbedOptions(**{**FAST, "shard": (i, 3)})).written
    assert sorted(done) == sorted(s.slide_id for s in cohort.slides)
    assert parse_shard("2/8") == (2, 8)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(MilhemaError):
            parse_shard(bad)


def test_unreadable_images_are_skipped_and_empty_folders_give_empty_bags(cohort, tmp_path: Path) -> None:
    first, second = cohort.slides[0], cohort.slides[1]
    n_first = len(list(first.source.glob("*.png")))
    (first.source / "cell_0000.png").write_bytes(b"not a png")
    for png in second.source.glob("*.png"):
        png.unlink()
    report = embed_cohort(cohort, tmp_path, EmbedOptions(**FAST))
    assert report.bad_images == 1 and report.empty == [second.slide_id]
    bag = read_bag(tmp_path / f"{first.slide_id}.h5")
    assert bag.n_cells == n_first - 1 and "cell_0000.png" not in set(bag.cell_ids)
    assert read_bag(tmp_path / f"{second.slide_id}.h5").n_cells == 0
    strict = EmbedOptions(**{**FAST, "fail_on_bad_image": True})
    with pytest.raises(EmbedError, match=f"slide {second.slide_id}: crop folder .* holds no images"):
        embed_cohort(cohort, tmp_path / "strict", strict)
    shutil.copy(first.source / "cell_0001.png", second.source / "cell_0001.png")
    with pytest.raises(EmbedError, match="not a readable image"):
        embed_cohort(cohort, tmp_path / "strict", strict)


def test_local_weights_safetensors_and_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = load_backbone("timm/resnet18", pretrained=False, input_size=64)
    state = {k: v.contiguous() for k, v in reference.model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    x = torch.randn(2, 3, 64, 64)
    for name in ("w.safetensors", "w.pth"):
        loaded = load_backbone("timm/resnet18", tmp_path / name, input_size=64)
        assert loaded.weights_sha256 == file_sha256(tmp_path / name)
        with torch.no_grad():
            assert torch.allclose(loaded.model(x), reference.model(x), atol=1e-5)
    wrong = {k: v for k, v in state.items() if not k.startswith("layer4")}
    save_file(wrong, str(tmp_path / "partial.safetensors"))
    with pytest.raises(EmbedError, match="do not fit backbone timm/resnet18"):
        load_backbone("timm/resnet18", tmp_path / "partial.safetensors")


def test_backbone_errors() -> None:
    with pytest.raises(EmbedError, match="did you mean"):
        load_backbone("timm/resnet181", pretrained=False)
    with pytest.raises(EmbedError, match="unknown backbone 'resnet18' \\(did you mean 'timm/resnet18'\\?\\)"):
        load_backbone("resnet18", pretrained=False)
    with pytest.raises(EmbedError, match="--no-pretrained"):
        load_backbone("timm/resnet18")
    with pytest.raises(EmbedError, match="not found"):
        load_backbone("timm/resnet18", "/nonexistent/w.safetensors")


def test_morphology_separates_lymphocytes_from_neutrophils_by_area() -> None:
    rng = np.random.default_rng(0)
    area = MORPHOLOGY_FEATURES.index("cell_area_um2")
    lobes = MORPHOLOGY_FEATURES.index("nucleus_lobes")
    feats = {}
    for cell_type in ("lymphocyte", "neutrophil"):
        rows = []
        for _ in range(40):
            rgb, _ = render_crop(cell_type, rng, Stain.random(rng), size=96)
            rows.append(morphology_features(rgb, 0.25))
        feats[cell_type] = np.array(rows)
    y = np.r_[np.zeros(40), np.ones(40)]
    assert roc_auc_score(y, np.r_[feats["lymphocyte"][:, area], feats["neutrophil"][:, area]]) > 0.9
    assert np.median(feats["lymphocyte"][:, area]) < np.median(feats["neutrophil"][:, area])
    # Real neutrophils of wbc-seg show ≥ 2 lobes to this count in 50–70 % of images at 0.08–0.16 µm/px,
    # lymphocytes in 4–14 %; at 0.25 µm/px lobes merge more often.
    assert np.mean(feats["neutrophil"][:, lobes] >= 2) > np.mean(feats["lymphocyte"][:, lobes] >= 2) + 0.2


def test_morphology_only_and_mpp_required(cohort, tmp_path: Path) -> None:
    report = embed_cohort(cohort, tmp_path, EmbedOptions(backbone="none", morphology=True, workers=0, progress=False))
    bag = read_bag(tmp_path / f"{cohort.slides[0].slide_id}.h5")
    assert report.cells > 0 and bag.feature_dim == len(MORPHOLOGY_FEATURES) and bag.backbone == "none"
    with pytest.raises(EmbedError, match="needs --morphology"):
        embed_cohort(cohort, tmp_path / "x", EmbedOptions(backbone="none", progress=False))


def test_morphology_counts_vacuoles_only_in_vacuolated_cells() -> None:
    rng = np.random.default_rng(4)
    vacuoles = MORPHOLOGY_FEATURES.index("vacuole_count")
    rate = {}
    for cell_type in ("vacuolated_neutrophil", "neutrophil", "monocyte", "vacuolated_monocyte"):
        counts = [morphology_features(render_crop(cell_type, rng, Stain.random(rng), size=96)[0], 0.25)[vacuoles]
                  for _ in range(25)]
        rate[cell_type] = np.mean(np.array(counts) >= 2)
    assert rate["vacuolated_neutrophil"] > 0.8 and rate["vacuolated_monocyte"] > 0.8
    assert rate["neutrophil"] < 0.1 and rate["monocyte"] < 0.1


@pytest.mark.parametrize("profile", ["analyser-100x", "camera-yellow", "wright-pale"])
def test_morphology_cell_area_holds_across_acquisition_profiles(profile: str) -> None:
    """The cytoplasm is told from red cells by colours read from each crop: a fixed hue rule lost a
    camera's pink-orange neutrophil cytoplasm (~23 µm² for a ~140 µm² cell) and took pale red cells
    into a lymphocyte on pale Wright slides (~130 µm²)."""
    from milhema.synth.acquisition import PROFILES, slide_look

    p = PROFILES[profile]
    rng = np.random.default_rng(1)
    area = MORPHOLOGY_FEATURES.index("cell_area_um2")
    median = {}
    for cell_type in ("lymphocyte", "neutrophil", "eosinophil"):
        areas = []
        for _ in range(10):
            stain, light = slide_look(p, rng, 1.0, rng, p.mpp)
            lamp = None if light is None else np.asarray(light.lamp, np.float32)
            rgb, _ = render_crop(cell_type, rng, stain, size=round(24 / p.mpp), mpp=p.mpp, light=lamp)
            areas.append(morphology_features(rgb, p.mpp)[area])
        median[cell_type] = float(np.median(areas))
    assert 40 < median["lymphocyte"] < 100, median
    assert 90 < median["neutrophil"] < 200, median
    assert 90 < median["eosinophil"] < 200, median
