"""Acquisition profiles of ``milhema synth``: measured on what they render, deterministic, and the
default profile unchanged (its digests were recorded with the simulator before profiles existed)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tiffslide
from PIL import Image
from test_synth import _tree_digest

from milhema.cli import main
from milhema.embed.stain import glass_colour
from milhema.errors import MilhemaError
from milhema.synth import synthesize_cohort
from milhema.synth.acquisition import NAMED_PROFILES, PROFILES

# Decoded pixels + every other file of two small default cohorts, made by milhema before acquisition
# profiles existed (commit 998cfe9; recomputed at the merge with the cell classifier, whose anomaly
# columns in cells.csv and the truth files are the only change: the same digests came from main
# just before the merge; recomputed on 2026-11-28 when granulocyte nuclei were given their real size,
# docs/SIMULATION.md, the only change to the rendering): crop folders, and one --wsi scan.
DEFAULT_CROPS_DIGEST = "61d427d98dd60a2c17e1c1da804df36d8b994530a969f15cf2e1df39797ef49f"
DEFAULT_SCAN_DIGEST = "a442f780dd46898263d4ff476c47be24138b0f56b3e89e311dc32b1c83b891fb"


def _content_digest(root: Path) -> str:
    """SHA-256 over file names, decoded image pixels (PNG crops, level 0 of scans) and other files' bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        if path.suffix == ".png":
            with Image.open(path) as image:
                digest.update(np.asarray(image).tobytes())
        elif path.suffix == ".tiff":
            slide = tiffslide.TiffSlide(path)
            digest.update(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)).tobytes())
            slide.close()
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _slides(cohort: Path) -> list[dict[str, str]]:
    with open(cohort / "slides.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_default_profile_writes_what_the_simulator_always_wrote(tmp_path: Path) -> None:
    crops = synthesize_cohort(tmp_path / "c", 4, seed=3, cells_per_slide=6, crop_px=48, workers=1, progress=False)
    scan = synthesize_cohort(tmp_path / "w", 1, seed=5, cells_per_slide=8, wsi=True, wsi_size=1024, workers=1,
                             progress=False)
    assert _content_digest(crops) == DEFAULT_CROPS_DIGEST
    assert _content_digest(scan) == DEFAULT_SCAN_DIGEST
    named = synthesize_cohort(tmp_path / "d", 4, seed=3, cells_per_slide=6, crop_px=48, workers=1, progress=False,
                              acquisition="default")
    assert _tree_digest(named) == _tree_digest(crops)
    assert "acquisition" not in json.loads((crops / "synth.json").read_text())


@pytest.fixture(scope="module")
def profile_cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One patient's crop folders (~4 cells per slide) under every named profile, same seed."""
    root = tmp_path_factory.mktemp("profiles")
    return {name: synthesize_cohort(root / name, 1, seed=7, cells_per_slide=4, acquisition=name, workers=1,
                                    progress=False) for name in NAMED_PROFILES}


def test_profiles_render_their_pixel_size_glass_and_tint(profile_cohorts: dict[str, Path]) -> None:
    glass = {}
    for name, cohort in profile_cohorts.items():
        profile = PROFILES[name]
        side = round(24.0 / profile.mpp)
        rows = _slides(cohort)
        assert all(float(r["mpp"]) == pytest.approx(profile.mpp) for r in rows), name
        files = sorted((cohort / "slides").glob("*/cell_*.jpg"))
        assert files and not list((cohort / "slides").glob("*/*.png")), name   # JPEG at the profile's quality
        images = [_read(f) for f in files]
        assert all(i.shape == (side, side, 3) for i in images), name
        glass[name] = np.median([glass_colour(i) for i in images], axis=0)
        expected = np.asarray(profile.background)
        # A camera crop is cut from anywhere in a vignetted field: up to (1 - vignetting) of the centre.
        assert np.all(glass[name] <= expected * 1.06 + 3), (name, glass[name], expected)
        assert np.all(glass[name] >= expected * (1.0 - profile.vignetting) * 0.94 - 3), (name, glass[name], expected)
        if not profile.vignetting:
            np.testing.assert_allclose(glass[name], expected, rtol=0.06, atol=3, err_msg=name)
    # The tints: yellow camera glass lacks blue; the analyser's is cream (R > G > B); dim glass is dim.
    r, g, b = glass["camera-yellow"]
    assert b < r - 50 and b < g - 45
    r, g, b = glass["analyser-100x"]
    assert r > g + 10 > b + 20
    assert glass["camera-dim"].max() < 180 and glass["scanner-40x"].min() > 215
    # Stains: pale Wright absorbs less than MGG at full strength (the darkest tenth of the crops).
    def darkest(name: str) -> float:
        pixels = np.concatenate([_read(f).reshape(-1, 3).sum(1) for f in (profile_cohorts[name] / "slides").glob("*/*.jpg")])
        return float(np.percentile(pixels, 5))
    assert darkest("wright-pale") > darkest("scanner-40x") + 60


def test_same_seed_is_byte_identical_per_profile_and_mixed_varies_per_slide(tmp_path: Path) -> None:
    a = synthesize_cohort(tmp_path / "a", 6, seed=2, cells_per_slide=3, acquisition="mixed", workers=1, progress=False)
    b = synthesize_cohort(tmp_path / "b", 6, seed=2, cells_per_slide=3, acquisition="mixed", workers=2, progress=False)
    assert _tree_digest(a) == _tree_digest(b)
    profiles = json.loads((a / "synth.json").read_text())["slide_profiles"]
    assert len(set(profiles.values())) >= 3 and set(profiles.values()) <= set(NAMED_PROFILES)
    mpps = {r["slide_id"]: float(r["mpp"]) for r in _slides(a)}
    assert all(mpps[s] == pytest.approx(PROFILES[p].mpp) for s, p in profiles.items())
    c = synthesize_cohort(tmp_path / "c", 2, seed=2, cells_per_slide=3, acquisition="camera-yellow", workers=1,
                          progress=False)
    d = synthesize_cohort(tmp_path / "d", 2, seed=2, cells_per_slide=3, acquisition="camera-yellow", workers=2,
                          progress=False)
    e = synthesize_cohort(tmp_path / "e", 2, seed=2, cells_per_slide=3, acquisition="wright-pale", workers=1,
                          progress=False)
    assert _tree_digest(c) == _tree_digest(d) != _tree_digest(e)
    # Another profile, the same patients and cells (what tools/domain_shift.py relies on).
    assert (c / "patients.csv").read_bytes() == (e / "patients.csv").read_bytes()
    truth = [(s / "cells.csv").read_text().replace(".jpg", "") for s in sorted((c / "slides").iterdir())]
    assert truth == [(s / "cells.csv").read_text().replace(".jpg", "") for s in sorted((e / "slides").iterdir())]


def test_fields_have_vignetting_and_truth_and_scans_the_profile_mpp(tmp_path: Path) -> None:
    fields = synthesize_cohort(tmp_path / "f", 1, seed=4, cells_per_slide=6, acquisition="camera-yellow", fields=True,
                               mpp=0.5, workers=1, progress=False)
    rows = _slides(fields)
    assert {r["kind"] for r in rows} == {"fields"} and all(float(r["mpp"]) == 0.5 for r in rows)
    images = sorted((fields / "slides").glob("*/field_*.jpg"))
    assert images and all((p.with_name(p.stem + ".cells.csv")).is_file() for p in images)
    rgb = _read(images[0]).astype(float)
    assert rgb.shape == (960, 1280, 3)
    centre = glass_colour(rgb[380:580, 540:740].astype(np.uint8))
    corner = glass_colour(rgb[:160, :200].astype(np.uint8))
    assert 0.6 < corner.mean() / centre.mean() < 0.9            # 30 % vignetting, axis near the centre
    flat = synthesize_cohort(tmp_path / "g", 1, seed=4, cells_per_slide=6, fields=True, workers=1, progress=False)
    flat_rgb = _read(sorted((flat / "slides").glob("*/field_*.png"))[0])
    assert glass_colour(flat_rgb[:160, :200]).mean() / glass_colour(flat_rgb[380:580, 540:740]).mean() > 0.95
    scans = synthesize_cohort(tmp_path / "s", 1, seed=4, cells_per_slide=6, wsi=True, acquisition="scanner-20x",
                              workers=1, progress=False)
    slide = tiffslide.TiffSlide(next((scans / "slides").glob("*.tiff")))
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
    region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    np.testing.assert_allclose(glass_colour(region), PROFILES["scanner-20x"].background, rtol=0.06)


def test_cli_lists_profiles_and_refuses_bad_combinations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in (*PROFILES, "mixed")) and "glass (250, 244, 172)" in text
    with pytest.raises(MilhemaError, match="--mpp or --crop-px"):
        synthesize_cohort(tmp_path / "x", 1, mpp=0.1, crop_px=96, progress=False)
    with pytest.raises(MilhemaError, match="--acquisition must be one of"):
        synthesize_cohort(tmp_path / "x", 1, acquisition="camera-green", progress=False)
    with pytest.raises(MilhemaError, match="--wsi or --fields"):
        synthesize_cohort(tmp_path / "x", 1, wsi=True, fields=True, progress=False)
    assert main(["synth", "--out", str(tmp_path / "y"), "--patients", "1", "--cells", "2", "--acquisition",
                 "analyser-100x", "--mpp", "0.08", "-q"]) == 0
    assert "acquisition analyser-100x" in capsys.readouterr().out
    assert {float(r["mpp"]) for r in _slides(tmp_path / "y")} == {0.08}
    assert _read(next((tmp_path / "y" / "slides").glob("*/cell_*.jpg"))).shape == (300, 300, 3)
    # Scans (and fields) are multi-centre unless a profile is named; crops keep the default look.
    assert main(["synth", "--out", str(tmp_path / "z"), "--patients", "2", "--cells", "2", "--wsi",
                 "--wsi-size", "512", "-q"]) == 0
    assert "acquisition mixed" in capsys.readouterr().out
    assert json.loads((tmp_path / "z" / "synth.json").read_text())["acquisition"] == "mixed"
