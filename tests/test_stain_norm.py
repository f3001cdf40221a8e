"""Stain normalisation in ``milhema embed``: crops move toward the reference, each slide is mapped
with its own stain (cells keep their differences), and the method and reference are recorded in
the bags, so a folder normalised otherwise is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from milhema.bags import read_bag, read_bag_attrs
from milhema.cli import main
from milhema.embed.morphology import MORPHOLOGY_FEATURES, morphology_features
from milhema.embed.stain import REFERENCE_FILE, SlideNormaliser, fit_reference, glass_colour, load_reference
from milhema.errors import EmbedError
from milhema.synth import synthesize_cohort
from milhema.synth.acquisition import PROFILES, slide_look
from milhema.synth.crop import render_crop

MORPH = ["--backbone", "none", "--morphology", "--workers", "0", "-q"]
SHAPE_FEATURES = ("cell_area_um2", "nucleus_area_um2", "nc_ratio", "nucleus_lobes", "nucleus_solidity",
                  "nucleus_roundness", "nucleus_eccentricity")


def _crops(profile: str, n: int, seed: int) -> list[np.ndarray]:
    """``n`` crops (96 px, 0.25 µm/px) of one slide of ``profile``, no vignetting."""
    rng = np.random.default_rng([seed])
    stain, light = slide_look(PROFILES[profile], rng, 1.0, np.random.default_rng([seed, 1]), 0.25)
    assert light is not None
    types = ["neutrophil", "lymphocyte", "blast", "monocyte", "eosinophil"]
    return [render_crop(types[k % 5], rng, stain, size=96, mpp=0.25, light=np.asarray(light.lamp, np.float32))[0]
            for k in range(n)]


def _distance(a: dict[str, list[object]], b: dict[str, list[object]]) -> float:
    """Relative difference between two fitted parameter sets (stain vectors, scales, glass / LAB statistics)."""
    return sum(float(np.linalg.norm(np.subtract(a[k], b[k])) / np.linalg.norm(b[k])) for k in b)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalisation_moves_another_lab_toward_the_reference(method: str) -> None:
    reference = fit_reference(method, _crops("scanner-40x", 20, 1), "test")
    for profile in ("camera-yellow", "wright-pale", "camera-dim"):
        crops = _crops(profile, 16, 3)
        normalise = SlideNormaliser(reference, crops)
        out = [normalise(c) for c in crops]
        assert all(o.shape == c.shape and o.dtype == np.uint8 for o, c in zip(out, crops, strict=True))
        # Measured as the method measures a stain: fitted again on the crops before and after.
        before = _distance(fit_reference(method, crops, "").params, reference.params)
        after = _distance(fit_reference(method, out, "").params, reference.params)
        assert after < 0.5 * before, (method, profile, before, after)
    if method == "macenko":   # the yellow glass becomes the reference's
        yellow = _crops("camera-yellow", 8, 4)
        glass = np.median([glass_colour(SlideNormaliser(reference, yellow)(c)) for c in yellow], axis=0)
        np.testing.assert_allclose(glass, reference.params["glass"], atol=10)


def test_a_slide_is_mapped_as_a_whole_so_a_pale_cell_stays_pale() -> None:
    reference = fit_reference("macenko", _crops("scanner-40x", 20, 1), "test")
    crops = _crops("wright-pale", 16, 5)
    normalise = SlideNormaliser(reference, crops)
    cell = crops[2]
    pale = (255.0 * np.exp(0.6 * np.log((cell.astype(float) + 1) / 256.0))).astype(np.uint8)  # 60 % of the stain
    dark_out, pale_out = normalise(cell), normalise(pale)
    # Fitted crop by crop, both would come out alike; mapped with the slide's stain, the pale one stays paler.
    assert pale_out.astype(float).sum(-1).min() > dark_out.astype(float).sum(-1).min() + 60
    np.testing.assert_array_equal(normalise(cell), dark_out)   # deterministic


def test_morphology_segments_the_cell_as_imaged_and_reads_its_colours_normalised() -> None:
    """Segmenting the normalised crop changed the cells' areas (morphology version 5): Macenko's two
    stains gave a camera-dim lymphocyte's pale cytoplasm the red cells' hue (194 → 70 µm²) and took red
    cells into camera-yellow neutrophils (101 → 181 µm²). The shapes now come from the crop as
    imaged, the optical densities from the normalised one."""
    reference = fit_reference("macenko", _crops("scanner-40x", 20, 1), "test")
    shape = [MORPHOLOGY_FEATURES.index(name) for name in SHAPE_FEATURES]
    colour = [MORPHOLOGY_FEATURES.index(f"{part}_od_{c}") for part in ("nucleus", "cytoplasm") for c in "rgb"]
    for profile in ("camera-dim", "camera-yellow"):
        crops = _crops(profile, 10, 3)
        normalise = SlideNormaliser(reference, crops)
        for crop in crops:
            out = normalise(crop)
            plain, normed = morphology_features(crop, 0.25), morphology_features(crop, 0.25, colours=out)
            assert plain[0] > 40.0, profile
            np.testing.assert_array_equal(plain[shape], normed[shape])
            assert not np.allclose(plain[colour], normed[colour]), profile
    with pytest.raises(ValueError, match="shape"):
        morphology_features(crops[0], 0.25, colours=crops[0][:-1])


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stain")
    train = synthesize_cohort(root / "train", 4, seed=1, cells_per_slide=3, acquisition="scanner-40x", workers=1,
                              progress=False)
    test = synthesize_cohort(root / "test", 4, seed=2, cells_per_slide=3, acquisition="wright-pale", workers=1,
                             progress=False)
    return train, test


def test_embed_records_the_normalisation_and_refuses_another_in_one_line(
        cohorts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, test = cohorts
    plain, normed = tmp_path / "plain", tmp_path / "normed"
    shape = [MORPHOLOGY_FEATURES.index(name) for name in SHAPE_FEATURES]
    assert main(["embed", "--cohort", str(train), "--out", str(plain), *MORPH]) == 0
    assert main(["embed", "--cohort", str(train), "--out", str(normed), *MORPH, "--stain-normalize", "macenko"]) == 0
    reference = load_reference(normed / REFERENCE_FILE, "macenko")
    assert reference.source.startswith("cohort train: ") and "of 8 slides" in reference.source
    for bag in sorted(normed.glob("*.h5")):
        attrs = read_bag_attrs(bag)
        assert attrs["stain_normalize"] == "macenko"
        assert json.loads(attrs["stain_reference"])["sha256"] == reference.sha256
        signature = json.loads(attrs["embed_signature"])
        assert signature["stain_normalize"] == "macenko" and signature["stain_reference"] == reference.sha256
        before, after = read_bag(plain / bag.name), read_bag(normed / bag.name)
        np.testing.assert_array_equal(before.thumbnails, after.thumbnails)   # galleries show the cells as they are
        assert not np.allclose(before.features, after.features)              # the features see them normalised ...
        np.testing.assert_array_equal(before.features[:, shape], after.features[:, shape])  # ... but not the shapes
    assert read_bag_attrs(next(plain.glob("*.h5")))["stain_normalize"] == "none"
    assert "stain_normalize" not in json.loads(read_bag_attrs(next(plain.glob("*.h5")))["embed_signature"])
    capsys.readouterr()
    # Resumed the same way: nothing to do. Another normalisation, or none, into the folder: one line, status 2.
    assert main(["embed", "--cohort", str(train), "--out", str(normed), *MORPH, "--stain-normalize", "macenko"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    for other in (["--stain-normalize", "reinhard"], []):
        assert main(["embed", "--cohort", str(train), "--out", str(normed), *MORPH, *other]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--stain-normalize" in err and "macenko" in err, err
    assert main(["embed", "--cohort", str(train), "--out", str(plain), *MORPH, "--stain-normalize", "reinhard"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "embedded with --stain-normalize none, not reinhard" in err, err
    # Another cohort normalised to the training cohort's reference.
    test_bags = tmp_path / "test_bags"
    assert main(["embed", "--cohort", str(test), "--out", str(test_bags), *MORPH, "--stain-normalize", "macenko",
                 "--stain-reference", str(normed / REFERENCE_FILE)]) == 0
    assert load_reference(test_bags / REFERENCE_FILE, "macenko").sha256 == reference.sha256
    assert all(json.loads(read_bag_attrs(b)["stain_reference"])["sha256"] == reference.sha256
               for b in test_bags.glob("*.h5"))


def test_reference_options_are_checked(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    from milhema.data import load_cohort
    from milhema.embed.pipeline import EmbedOptions, embed_cohort

    train, _ = cohorts
    cohort = load_cohort(train, ["AML", "MDS", "VEXAS", "reactive"], ())
    base = {"backbone": "none", "morphology": True, "workers": 0, "progress": False}
    with pytest.raises(EmbedError, match="--stain-reference needs --stain-normalize"):
        embed_cohort(cohort, tmp_path / "a", EmbedOptions(**base, stain_reference=tmp_path / "x.json"))
    with pytest.raises(EmbedError, match="with --shard needs its reference first"):
        embed_cohort(cohort, tmp_path / "b", EmbedOptions(**base, stain_normalize="reinhard", shard=(0, 2)))
    with pytest.raises(EmbedError, match="does not exist"):
        embed_cohort(cohort, tmp_path / "c", EmbedOptions(**base, stain_normalize="macenko",
                                                          stain_reference=tmp_path / "missing.json"))
    image = tmp_path / "ref.png"
    from PIL import Image

    Image.fromarray(np.concatenate(_crops("scanner-40x", 4, 1), axis=1)).save(image)
    report = embed_cohort(cohort, tmp_path / "d", EmbedOptions(**base, stain_normalize="reinhard",
                                                              stain_reference=image))
    assert report.written and load_reference(tmp_path / "d" / REFERENCE_FILE, "reinhard").source == "image ref.png"
    with pytest.raises(EmbedError, match="is a reinhard reference, not macenko"):
        load_reference(tmp_path / "d" / REFERENCE_FILE, "macenko")
