"""The patient report as a hematologist reads it: CBC ranges by sex and age, the differential with
Wilson intervals and WHO/ICC thresholds, galleries without repeats and at native resolution, and
no ranking where the scores are nearly uniform."""

from __future__ import annotations

import colorsys
import io
import math
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from milhema.data.cbc import cbc_flag, is_cbc_quantity, normalise_sex, reference_range
from milhema.data.differential import differential, wilson_interval
from milhema.differential import predicted_differential
from milhema.explain import figures
from milhema.explain.report import ReportContent, render_report
from milhema.explain.run import class_gallery_k, features_used
from milhema.explain.scores import score_contrast
from milhema.synth.cells import CELL_TYPES


@pytest.mark.parametrize("raw", ["F", "f", "female", "Female", "W", "w", "weiblich", "Frau", "femme", "Féminin", " F "])
def test_female_spellings(raw: str) -> None:
    assert normalise_sex(raw) == "F"


@pytest.mark.parametrize("raw", ["M", "m", "male", "MALE", "man", "männlich", "H", "homme", "masculin"])
def test_male_spellings(raw: str) -> None:
    assert normalise_sex(raw) == "M"


@pytest.mark.parametrize("raw", [None, "", "1", "2", "x", "unknown", "diverse"])
def test_unrecognised_sex_is_none(raw: str | None) -> None:
    assert normalise_sex(raw) is None


def test_hb_rbc_hct_are_flagged_against_the_patients_sex() -> None:
    # A woman's Hb of 12.5 g/dL is normal; a man's is low.
    assert cbc_flag("hb", 12.5, "F") == ("", "12–16 g/dL (women)")
    assert cbc_flag("Hb", 12.5, "weiblich")[0] == ""
    assert cbc_flag("hb", 12.5, "M") == ("low", "13.5–17.5 g/dL (men)")
    assert cbc_flag("hgb", 16.5, "F")[0] == "high" and cbc_flag("hgb", 16.5, "M")[0] == ""
    assert cbc_flag("rbc", 4.3, "F")[0] == "" and cbc_flag("rbc", 4.3, "M")[0] == "low"
    assert cbc_flag("hct", 38.0, "female")[0] == "" and cbc_flag("hct", 38.0, "male")[0] == "low"
    # Sex not known: only values outside both sexes' ranges are flagged.
    assert cbc_flag("hb", 12.5) == ("", "12–17.5 g/dL (either sex)")
    assert cbc_flag("hb", 11.9, "?")[0] == "low" and cbc_flag("hb", 17.6)[0] == "high"
    # Other quantities do not depend on sex.
    assert cbc_flag("wbc", 3.0, "F") == cbc_flag("wbc", 3.0, "M") == ("low", "4–10 G/L")
    assert is_cbc_quantity("HCT") and is_cbc_quantity("rbc") and not is_cbc_quantity("ferritin")


def test_children_are_not_flagged_against_adult_ranges() -> None:
    flag, reference = cbc_flag("hb", 10.5, "F", age=7)
    assert flag == "" and reference == "12–16 g/dL (adult range for women; not applied under 18)"
    assert cbc_flag("wbc", 15.0, "M", age=17.9) == ("", "4–10 G/L (adult range; not applied under 18)")
    assert cbc_flag("wbc", 15.0, "M", age=18)[0] == "high"
    assert cbc_flag("wbc", math.nan, age=5)[0] == "missing"
    r = reference_range("plt", age=2)
    assert r is not None and not r.applied and reference_range("ferritin") is None


def test_wilson_interval_matches_the_closed_form() -> None:
    for k, n in [(0, 10), (1, 25), (6, 24), (12, 12), (37, 200)]:
        p, z = k / n, 1.959963984540054
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        low, high = wilson_interval(k, n)
        assert low == pytest.approx(max(0.0, centre - half), abs=1e-9)
        assert high == pytest.approx(min(1.0, centre + half), abs=1e-9)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_differential_counts_white_cells_and_flags_who_icc_thresholds() -> None:
    types = ["neutrophil"] * 14 + ["blast"] * 6 + ["blast_auer"] + ["hypogranular_neutrophil"] * 3 + ["smudge"] * 2 + [""]
    rows = {r.name: r for r in differential(types)}
    assert rows["neutrophil"].of == 24 and rows["neutrophil"].percent == pytest.approx(100 * 14 / 24)
    assert not rows["smudge"].counted and rows["smudge"].n == 2 and not rows["(no type)"].counted
    low, high = wilson_interval(6, 24)
    assert (rows["blast"].ci_low, rows["blast"].ci_high) == pytest.approx((100 * low, 100 * high))
    blasts = rows["blasts (blast + blast_auer)"]
    assert blasts.group and blasts.n == 7 and blasts.flag == "AML range" and blasts.threshold == 20
    assert blasts.below_in_ci                       # 29 % of 24 cells: the interval reaches below 20 %
    assert rows["blast_auer"].flag == "Auer rods"
    dysplasia = rows["dysplastic neutrophils (hypogranular_neutrophil), % of neutrophils"]
    assert (dysplasia.n, dysplasia.of, dysplasia.flag) == (3, 17, "dysplasia")
    # 1 blast in 60 cells (1.7 %) is under every blast threshold; 2 in 60 (3.3 %) is MDS-IB1's range.
    one = {r.name: r for r in differential(["neutrophil"] * 59 + ["blast"])}
    assert one["blast"].flag == ""
    two = {r.name: r for r in differential(["neutrophil"] * 58 + ["blast"] * 2)}
    assert two["blast"].flag == "high" and "MDS-IB1" in two["blast"].meaning
    assert [r.name for r in differential(["neutrophil"] * 9 + ["lymphocyte"])] == ["neutrophil", "lymphocyte"]


def test_predicted_differential_is_the_annotated_one_for_a_certain_classifier_and_wider_when_unsure() -> None:
    types = ["neutrophil"] * 14 + ["blast"] * 6 + ["blast_auer"] + ["hypogranular_neutrophil"] * 3 + ["smudge"] * 2
    names = sorted(set(types))
    certain = np.eye(len(names))[[names.index(t) for t in types]]
    annotated = {r.name: r for r in differential(types)}
    predicted = {r.name: r for r in predicted_differential(names, certain)}
    assert set(predicted) == set(annotated)
    for name, a in annotated.items():
        p = predicted[name]
        assert (p.n, p.of, p.group, p.flag) == (pytest.approx(a.n), pytest.approx(a.of), a.group, a.flag)
        if a.counted:
            assert p.percent == pytest.approx(a.percent)
            # Jeffreys' interval of the count where the annotation's is Wilson's: close, never the same method.
            assert p.ci_low <= p.percent <= p.ci_high and abs(p.ci_low - a.ci_low) < 6 and abs(p.ci_high - a.ci_high) < 6
    unsure = 0.7 * certain + 0.3 / len(names)
    blur = {r.name: r for r in predicted_differential(names, unsure)}
    assert blur["blast"].ci_high - blur["blast"].ci_low > predicted["blast"].ci_high - predicted["blast"].ci_low
    assert blur["smudge"].n == pytest.approx(unsure[:, names.index("smudge")].sum()) and not blur["smudge"].counted


def test_nearly_uniform_attention_is_not_a_ranking() -> None:
    rng = np.random.default_rng(0)
    flat = rng.uniform(0.039, 0.051, 25)
    flat /= flat.sum()
    c = score_contrast(flat, "attention")
    assert not c.singled_out and c.statistic < 2 and c.entropy > 0.99 and "did not single out" in c.text
    peaked = np.full(25, 1.0)
    peaked[3] = 10.0
    assert score_contrast(peaked / peaked.sum(), "attention").singled_out
    # One cell at ten times the others in a 500-cell bag: singled out, though the entropy barely moves.
    big = np.full(500, 1.0)
    big[0] = 10.0
    c = score_contrast(big / big.sum(), "attention")
    assert c.singled_out and c.entropy > 0.99
    # One artefact near zero does not make a flat bag look contrasted (max / median, not max / min).
    flat[0] = 1e-6
    assert not score_contrast(flat, "attention").singled_out
    # Occlusion: no cell moves the predicted probability by more than 1 percentage point.
    assert not score_contrast(rng.uniform(-0.004, 0.006, 30), "occlusion").singled_out
    assert score_contrast(np.r_[rng.uniform(-0.004, 0.006, 29), -0.03], "occlusion").singled_out
    assert not score_contrast(np.array([1.0]), "attention").singled_out


def _solid_thumbnails(n: int, size: int = 64) -> np.ndarray:
    """Cell i is a flat tile of a colour no other cell (and no label or background) has."""
    colours = np.stack([np.array([20 + 9 * (i % 23), 30 + 7 * (i // 23), 200 - 3 * i]) for i in range(n)])
    return np.broadcast_to(colours[:, None, None, :].astype(np.uint8), (n, size, size, 3)).copy()


def _pixels_per_cell(png: bytes, thumbnails: np.ndarray) -> np.ndarray:
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return np.array([int(np.all(image == t[0, 0], axis=1).sum()) for t in thumbnails])


def test_gallery_never_shows_a_cell_twice_and_draws_tiles_at_a_whole_scale() -> None:
    n = 22
    thumbs = _solid_thumbnails(n)
    scores = np.random.default_rng(1).dirichlet(np.ones(n))
    png = figures.gallery(thumbs, scores, np.array(["neutrophil"] * n, object), 16, "P1 (attention)")
    counts = _pixels_per_cell(png, thumbs)
    scale = figures.tile_scale(64)
    assert scale == 2
    # Each cell shown is one exact, unblurred 128 x 128 tile; 11 highest + 11 lowest = every cell once.
    assert set(counts.tolist()) == {(64 * scale) ** 2}
    image = Image.open(io.BytesIO(png))
    assert image.width <= figures.MAX_WIDTH_PX and figures.LABEL_PT >= 8
    assert figures.gallery_k(22, 16) == 11 and figures.gallery_k(1, 16) == 1 and figures.gallery_k(100, 16) == 16
    # A one-cell bag has a "highest" section only.
    one = figures.gallery(thumbs[:1], np.array([1.0]), None, 16, "P2")
    assert _pixels_per_cell(one, thumbs[:1]).tolist() == [(64 * scale) ** 2]
    # Not ranked: k cells spread over the bag, each once.
    flat = figures.gallery(thumbs, np.full(n, 1 / n), None, 16, "P3", ranked=False)
    shown = _pixels_per_cell(flat, thumbs)
    assert (shown > 0).sum() == 16 and set(shown[shown > 0].tolist()) == {(64 * scale) ** 2}


def _hue(colour: str) -> float:
    r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360


def test_cell_types_have_fixed_distinct_colours() -> None:
    colours = {t: figures.type_colour(t) for t in CELL_TYPES}
    assert len(set(colours.values())) == len(CELL_TYPES)
    for a, b in [("band", "blast"), ("lymphocyte", "eosinophil"), ("neutrophil", "blast"),
                 ("monocyte", "lymphocyte")]:
        gap = abs(_hue(colours[a]) - _hue(colours[b]))
        assert min(gap, 360 - gap) > 60, (a, b)
    for a, b in combinations(CELL_TYPES, 2):
        ca, cb = (np.array([int(colours[t][i:i + 2], 16) for i in (1, 3, 5)]) for t in (a, b))
        assert np.abs(ca - cb).sum() > 60, (a, b)
    assert figures.type_colour("my_custom_type") == figures.type_colour("my_custom_type")
    # The overview draws each type in its colour.
    feats = np.random.default_rng(2).normal(size=(200, 4))
    types = np.array(["band", "blast"] * 100, object)
    png = figures.overview(feats, np.linspace(1, 100, 200), types, "two types")
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    for name in ("band", "blast"):
        rgb = [int(figures.type_colour(name)[i:i + 2], 16) for i in (1, 3, 5)]
        assert (np.abs(image.astype(int) - rgb).sum(axis=1) <= 3).sum() > 50, name


def _content(**extra: object) -> ReportContent:
    base: dict[str, object] = dict(patient_id="P1", classes=["reactive", "AML"], probs=np.array([0.3, 0.7]),
                                   label="AML", cbc={"wbc": 3.1, "hb": 12.5}, method="attention", run="runs/x",
                                   model="abmil", fusion="late", features="morphology (16 features per cell)",
                                   date="2026-01-01", n_cells=25, n_models=1)
    return ReportContent(**(base | extra))  # type: ignore[arg-type]


def test_report_header_shows_sex_and_age_and_uses_them() -> None:
    woman = render_report(_content(sex="W", age=45.0))
    assert "female, 45 years" in woman and "12–16 g/dL (women)" in woman
    assert '<td class="num low">12.5</td>' not in woman and '<td class="num low">3.1</td>' in woman
    man = render_report(_content(sex="M", age=45.0))
    assert "male, 45 years" in man and '<td class="num low">12.5</td>' in man
    child = render_report(_content(sex="F", age=9.0))
    assert "9 years (child: adult CBC ranges not applied)" in child and "not applied under 18" in child
    assert 'class="num low"' not in child
    unknown = render_report(_content())
    assert "sex not given, age not given" in unknown and "(either sex)" in unknown


def test_features_used_names_the_blocks_the_model_read() -> None:
    used, text = features_used(["morphology"], "timm/resnet18:512,morphology:16", "timm/resnet18", 16)
    assert used == ["morphology"]
    assert text == "morphology (16 features per cell); not read: timm/resnet18 (512) (data.feature_blocks: morphology)"
    used, text = features_used(None, "timm/resnet18:512,morphology:16", "timm/resnet18", 528)
    assert used == ["timm/resnet18", "morphology"] and text == "timm/resnet18 (512) + morphology (16) = 528 features per cell"
    assert features_used(None, "", "ctranspath", 768) == (["ctranspath"], "ctranspath (768 features per cell)")


def test_class_galleries_are_sized_so_classes_need_not_share_cells() -> None:
    assert class_gallery_k(25, 2, 16) == 12
    assert class_gallery_k(25, 4, 16) == 6
    assert class_gallery_k(500, 4, 16) == 16
    assert class_gallery_k(3, 4, 16) == 1
