"""milhema explain: scores mapped to cells, occlusion vs a planted cell, GeoJSON, HTML, every model family."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from milhema.bags import read_bag, write_bag
from milhema.cli import main

CLASSES = ["reactive", "AML"]
BASE = ["--set", "data.classes=[reactive, AML]", "--set", "data.patient_features=[wbc, hb]",
        "--set", "data.log_features=[wbc]", "--set", "train.batch_size=8", "-q"]


def _planted(root: Path, n_patients: int = 16, dim: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """AML patients hold exactly one planted cell with feature 0 = 5 (others ~N(0, 1)); even patients have 2 slides.

    Bags record two feature blocks (``test/planted`` 5 columns, ``marker`` 1); patients.csv has
    ``age`` and ``sex`` in several spellings (P01: "W", German for female, 34 years; P05: 12 years).
    """
    rng = np.random.default_rng(seed)
    cohort, bags = root / "cohort", root / "bags"
    (cohort / "src").mkdir(parents=True)
    patients, slides = ["patient_id,label,wbc,hb,age,sex"], ["slide_id,patient_id,source,view"]
    sexes = ["F", "W", "m", "female", "M", "", "male", "f"]
    for i in range(n_patients):
        label = CLASSES[i % 2]
        age = 12 if i == 5 else 34 if i == 1 else 40 + 3 * i
        patients.append(f"P{i:02d},{label},{rng.lognormal(1.8, 0.4):.2f},{rng.normal(14, 2):.1f},{age},"
                        f"{sexes[i % len(sexes)]}")
        n_slides = 2 if i % 4 < 2 else 1
        planted_slide = int(rng.integers(n_slides))
        for s in range(n_slides):
            n = int(rng.integers(8, 16))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            x[:, 0] = np.clip(x[:, 0], -2.5, 2.5)
            diagnostic = np.zeros(n, bool)
            if label == "AML" and s == planted_slide:
                j = int(rng.integers(n))
                x[j, 0] = 5.0
                diagnostic[j] = True
            sid = f"P{i:02d}_S{s}"
            slides.append(f"{sid},P{i:02d},src,{'PB' if s == 0 else 'BM'}")
            types = np.where(diagnostic, "blast", "neutrophil")
            thumbs = rng.integers(0, 255, size=(n, 64, 64, 3), dtype=np.uint8)
            write_bag(bags / f"{sid}.h5", x, slide_id=sid, patient_id=f"P{i:02d}", diagnostic=diagnostic,
                      cell_ids=[f"c{j}" for j in range(n)], cell_types=types, thumbnails=thumbs,
                      backbone="test/planted", extra_attrs={"feature_blocks": f"test/planted:{dim - 1},marker:1"})
    (cohort / "patients.csv").write_text("\n".join(patients) + "\n")
    (cohort / "slides.csv").write_text("\n".join(slides) + "\n")
    return cohort, bags


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _planted(tmp_path_factory.mktemp("explain_planted"))


@pytest.fixture(scope="module")
def cv_run(planted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    cohort, bags = planted
    out = tmp_path_factory.mktemp("explain_runs") / "cv"
    code = main(["cv", "--cohort", str(cohort), "--bags", str(bags), "--out", str(out), "--folds", "2",
                 "--set", "train.epochs=3", "--set", "model.hidden_dim=16", *BASE])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def trained_run(planted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that has learnt the planted cell (one model on all patients, enough epochs)."""
    cohort, bags = planted
    out = tmp_path_factory.mktemp("explain_trained") / "run"
    assert main(["train", "--cohort", str(cohort), "--bags", str(bags), "--out", str(out),
                 "--set", "train.epochs=40", "--set", "train.patience=40", "--set", "train.lr=0.01",
                 "--set", "model.hidden_dim=16", "--set", "fusion.mode=none", *BASE]) == 0
    return out


def _explain(run: Path, planted: tuple[Path, Path], out: Path, *extra: str) -> dict:
    cohort, bags = planted
    code = main(["explain", "--run", str(run), "--cohort", str(cohort), "--bags", str(bags), "--out", str(out),
                 "-q", *extra])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def attention_out(cv_run: Path, planted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("explain_out") / "attention"
    _explain(cv_run, planted, out, "--top-k", "4", "--patient", "P00", "P01", "P04", "P05")
    return out


def test_scores_map_back_to_cells_across_slides(attention_out: Path, planted: tuple[Path, Path]) -> None:
    _, bags = planted
    summary = json.loads((attention_out / "summary.json").read_text())
    assert summary["n_patients"] == 4 and summary["method"] == "attention"
    assert (attention_out / "overview.png").stat().st_size > 1000
    for pid in ("P00", "P01", "P04"):     # P00, P01 have two slides (slides.csv order kept)
        rows = _rows(attention_out / pid / "cell_scores.csv")
        expected = []
        for s in (0, 1):
            path = bags / f"{pid}_S{s}.h5"
            if path.exists():
                bag = read_bag(path, thumbnails=False)
                expected += [(bag.slide_id, c, t) for c, t in zip(bag.cell_ids, bag.cell_types, strict=True)]
        assert [(r["slide_id"], r["cell_id"], r["cell_type"]) for r in rows] == expected
        scores = np.array([float(r["score"]) for r in rows])
        pct = np.array([float(r["rank_pct"]) for r in rows])
        assert scores.sum() == pytest.approx(1.0, abs=1e-4)
        assert ((pct > 0) & (pct <= 100)).all()
        order = np.argsort(scores, kind="stable")
        assert (np.diff(pct[order]) >= -1e-6).all()   # percentile rises with the score
        assert rows[0]["x"] == "" and (attention_out / pid / "mosaic.png").exists()
        assert not list((attention_out / pid).glob("*.geojson"))   # crop folders: no GeoJSON
        assert (attention_out / pid / "gallery.png").exists()
    faith = summary["faithfulness"]["diagnostic_auroc"]
    assert faith["n_patients"] == 2 and 0.0 <= faith["mean"] <= 1.0


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]


def test_html_report_is_one_self_contained_file(attention_out: Path) -> None:
    folder = attention_out / "P01"
    assert len(list(folder.glob("*.html"))) == 1
    text = (folder / "report.html").read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(text)
    assert parser.refs and all(r.startswith("data:image/png;base64,") for r in parser.refs)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert not re.search(r"url\(|https?://|file:", text)
    assert "Patient P01" in text and "AML" in text and "reference" in text
    # CBC flags against the ranges of docs/DOMAIN.md: hb ~ N(14, 2) so some patient is low or in range; wbc column shown.
    assert ">wbc<" in text and ">hb<" in text
    # P01's sex is "W" (weiblich): her Hb is read against the women's range, and the header says who she is.
    assert "female, 34 years" in text and "12–16 g/dL (women)" in text and "13.5–17.5" not in text
    # The model read both blocks of the bags, and the header says so (not just "backbone test/planted").
    assert "features read: test/planted (5) + marker (1) = 6 features per cell" in text
    # The differential sits beside the CBC, before the figures.
    assert text.index("Blood count and patient features") < text.index("formule leucocytaire") \
        < text.index("Where the model looked")
    child = (attention_out / "P05" / "report.html").read_text(encoding="utf-8")
    assert "12 years (child: adult CBC ranges not applied)" in child and "not applied under 18" in child
    assert 'class="num low"' not in child and 'class="num high"' not in child


def test_differential_file_and_summary(attention_out: Path, planted: tuple[Path, Path]) -> None:
    _, bags = planted
    summary = json.loads((attention_out / "summary.json").read_text())
    assert summary["feature_blocks"] == ["test/planted", "marker"]
    for pid in ("P00", "P01"):
        types = [t for p in sorted(bags.glob(f"{pid}_S*.h5")) for t in read_bag(p, thumbnails=False).cell_types]
        rows = {r["cell_type"]: r for r in _rows(attention_out / pid / "differential.csv")}
        n = len(types)
        assert int(rows["neutrophil"]["n"]) == types.count("neutrophil") and int(rows["neutrophil"]["of"]) == n
        assert float(rows["neutrophil"]["percent"]) == pytest.approx(100 * types.count("neutrophil") / n, abs=0.01)
        low, high = float(rows["neutrophil"]["ci95_low"]), float(rows["neutrophil"]["ci95_high"])
        assert low <= float(rows["neutrophil"]["percent"]) <= high and high - low > 5   # a few dozen cells: wide
        if summary["patients"][pid]["scores"]["singled_out"]:   # the types of the 4 most attended cells
            assert sum(int(r["in_top_k"] or 0) for r in rows.values()) == int(rows["neutrophil"]["top_k"]) == 4
        else:
            assert rows["neutrophil"]["in_top_k"] == ""
        entry = summary["patients"][pid]
        assert {r["cell_type"]: r["n"] for r in entry["differential"]} == {k: int(r["n"]) for k, r in rows.items()}
        assert entry["sex"] == "F" and entry["scores"]["singled_out"] in (True, False)
    # P01 (AML) has one blast among 8-15 cells per slide: >= 2 % of its cells, flagged, with the source's meaning.
    blast = {r["cell_type"]: r for r in _rows(attention_out / "P01" / "differential.csv")}["blast"]
    assert blast["flag"] in ("high", "AML range") and "WHO 2022" in blast["meaning"]
    assert not (attention_out / "P00" / "differential.csv").read_text().count("blast")


def test_header_names_the_feature_blocks_the_model_read(planted: tuple[Path, Path], tmp_path: Path) -> None:
    cohort, bags = planted
    run = tmp_path / "run"
    assert main(["train", "--cohort", str(cohort), "--bags", str(bags), "--out", str(run), "--set", "train.epochs=1",
                 "--set", "model.hidden_dim=16", "--set", "data.feature_blocks=[marker]", *BASE]) == 0
    summary = _explain(run, planted, tmp_path / "att", "--patient", "P01")
    assert summary["feature_blocks"] == ["marker"] and summary["backbone"] == "test/planted"
    text = (tmp_path / "att" / "P01" / "report.html").read_text(encoding="utf-8")
    assert "features read: marker (1 feature per cell); not read: test/planted (5)" in text
    assert "backbone test/planted" not in text


def test_occlusion_finds_the_planted_cell(trained_run: Path, planted: tuple[Path, Path], tmp_path: Path) -> None:
    aml = [f"P{i:02d}" for i in range(1, 16, 2)]
    summary = _explain(trained_run, planted, tmp_path / "occ", "--method", "occlusion", "--patient", *aml)
    hits = 0
    for pid in aml:
        rows = _rows(tmp_path / "occ" / pid / "cell_scores.csv")
        # The AML column: removing the planted cell must lower P(AML) the most (whatever was predicted).
        best = max(rows, key=lambda r: float(r["score_AML"]))
        hits += best["cell_type"] == "blast"
        assert {f"score_{c}" for c in CLASSES} <= set(rows[0])
    assert hits >= 6, f"planted cell ranked first by occlusion in only {hits} of 8 AML patients"
    assert summary["faithfulness"]["diagnostic_auroc"]["n_patients"] == 8



def test_explain_errors_are_one_line(cv_run: Path, planted: tuple[Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    cohort, bags = planted
    code = main(["explain", "--run", str(cv_run), "--cohort", str(cohort), "--bags", str(bags),
                 "--out", str(tmp_path / "x"), "--patient", "NOPE", "-q"])
    assert code == 2 and "NOPE" in capsys.readouterr().err


FAMILIES = {
    "abmil": ["--set", "model.name=abmil", "--set", "model.multi_branch=true"],
    "dsmil": ["--set", "model.name=dsmil"],
    "transformer": ["--set", "model.name=transformer", "--set", "model.n_layers=1"],
    "multiview": ["--set", "model.name=multiview"],
    "graph": ["--set", "model.name=graph", "--set", "model.k=4", "--set", "model.n_layers=1"],
    "meanpool": ["--set", "model.name=meanpool"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_model_family(family: str, planted: tuple[Path, Path], tmp_path: Path) -> None:
    cohort, bags = planted
    run = tmp_path / "run"
    assert main(["train", "--cohort", str(cohort), "--bags", str(bags), "--out", str(run),
                 "--set", "train.epochs=2", "--set", "model.hidden_dim=16", *FAMILIES[family], *BASE]) == 0
    summary = _explain(run, planted, tmp_path / "att", "--patient", "P00", "P01", "--top-k", "3")
    assert summary["model"] == family
    for pid in ("P00", "P01"):
        rows = _rows(tmp_path / "att" / pid / "cell_scores.csv")
        assert len(rows) == sum(read_bag(p, thumbnails=False).n_cells for p in bags.glob(f"{pid}_S*.h5"))
        scores = np.array([float(r["score"]) for r in rows])
        assert scores.sum() == pytest.approx(1.0, abs=1e-3) and (scores >= 0).all()
        has_branches = family in ("abmil", "dsmil")
        assert ("score_AML" in rows[0]) == has_branches
        assert (tmp_path / "att" / pid / "gallery_AML.png").exists() == has_branches
        if has_branches:   # per-class galleries say how many cells they show and why
            report = (tmp_path / "att" / pid / "report.html").read_text(encoding="utf-8")
            assert "cells for class AML (k = min(--top-k 3" in report or "class AML: the model did not" in report
    if family == "meanpool":
        # Mean pooling weighs every cell alike: the report must say so instead of ranking ties.
        entry = summary["patients"]["P01"]["scores"]
        assert entry["singled_out"] is False and entry["statistic"] == pytest.approx(1.0)
        text = (tmp_path / "att" / "P01" / "report.html").read_text(encoding="utf-8")
        assert "the model did not single out cells" in text and "highest scores" not in text
        assert "in bag order" in text and "top 3" not in text
    if family == "meanpool":   # occlusion is model-agnostic: check it on a model without attention
        _explain(run, planted, tmp_path / "occ", "--patient", "P01", "--method", "occlusion")
        rows = _rows(tmp_path / "occ" / "P01" / "cell_scores.csv")
        assert all(np.isfinite(float(r["score"])) for r in rows)


@pytest.fixture(scope="module")
def wsi_explained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny scanned cohort (1024 px slides, ~10 cells), embedded with morphology features, trained and explained."""
    from milhema.data.manifest import load_cohort
    from milhema.embed.pipeline import EmbedOptions, embed_cohort
    from milhema.synth import synthesize_cohort

    root = tmp_path_factory.mktemp("explain_wsi")
    cohort_dir = synthesize_cohort(root / "cohort", n_patients=4, seed=5, cells_per_slide=10, wsi=True,
                                   wsi_size=1024, workers=2, progress=False)
    bags = root / "bags"
    embed_cohort(load_cohort(cohort_dir, ["AML", "MDS", "VEXAS", "reactive"], ()), bags,
                 EmbedOptions(backbone="none", morphology=True, workers=0, progress=False))
    run = root / "run"
    assert main(["train", "--cohort", str(cohort_dir), "--bags", str(bags), "--out", str(run),
                 "--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "model.hidden_dim=16",
                 "--set", "model.multi_branch=true", "-q"]) == 0
    out = root / "explained"
    assert main(["explain", "--run", str(run), "--cohort", str(cohort_dir), "--bags", str(bags), "--out", str(out),
                 "--top-k", "4", "-q"]) == 0
    return out, bags


def test_wsi_geojson_and_heatmap(wsi_explained: tuple[Path, Path]) -> None:
    out, bags = wsi_explained
    documents = sorted(out.glob("*/*.geojson"))
    assert len(documents) == len(list(bags.glob("*.h5")))
    for path in documents:
        doc = json.loads(path.read_text())
        bag = read_bag(bags / f"{path.stem}.h5", thumbnails=False)
        assert doc["type"] == "FeatureCollection" and len(doc["features"]) == bag.n_cells
        for feature in doc["features"]:
            assert feature["type"] == "Feature"
            geometry, props = feature["geometry"], feature["properties"]
            assert geometry["type"] == "Polygon"
            ring = np.array(geometry["coordinates"][0])
            assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
            assert (ring >= 0).all() and (ring[:, 0] <= 1024).all() and (ring[:, 1] <= 1024).all()
            assert props["objectType"] == "detection"
            assert set(props["classification"]) == {"name", "color"} and len(props["classification"]["color"]) == 3
            m = props["measurements"]
            assert 0 <= m["score"] <= 1 and 0 < m["rank_pct"] <= 100
        assert (path.parent / f"heatmap_{path.stem}.png").stat().st_size > 5000
        rows = _rows(path.parent / "cell_scores.csv")
        assert all(r["x"] != "" for r in rows)
    report = next(out.glob("*/report.html")).read_text()
    assert report.count("data:image/png;base64,") >= 3 and "http" not in report
    assert "summary.json" in {p.name for p in out.iterdir()} and (out / "overview.png").exists()
