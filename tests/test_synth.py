from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milhema.config import DEFAULTS
from milhema.data import load_cohort
from milhema.errors import MilhemaError
from milhema.synth import synthesize_cohort
from milhema.synth.cbc import sample_cbc
from milhema.synth.cells import CELL_TYPES
from milhema.synth.composition import RATES, sample_disease, slide_cells
from milhema.synth.crop import render_crop
from milhema.synth.stain import Stain

DIAGNOSTIC_TYPES = {
    "AML": {"blast", "blast_auer"},
    "MDS": {"hypogranular_neutrophil", "pseudo_pelger", "vacuolated_neutrophil", "blast", "blast_auer"},
    "VEXAS": {"vacuolated_neutrophil", "vacuolated_monocyte", "pseudo_pelger", "hypogranular_neutrophil"},
    "reactive": {"reactive_lymphocyte"},
}


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_is_byte_identical_whatever_the_workers(tmp_path: Path) -> None:
    a = synthesize_cohort(tmp_path / "a", 6, seed=3, cells_per_slide=6, crop_px=48, workers=1, progress=False)
    b = synthesize_cohort(tmp_path / "b", 6, seed=3, cells_per_slide=6, crop_px=48, workers=2, progress=False)
    c = synthesize_cohort(tmp_path / "c", 6, seed=4, cells_per_slide=6, crop_px=48, workers=1, progress=False)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)


def test_cohort_is_a_valid_manifest_with_consistent_truth(tiny_cohort: Path) -> None:
    cohort = load_cohort(tiny_cohort, DEFAULTS["data"]["classes"], DEFAULTS["data"]["patient_features"],
                         require_labels=True)
    assert len(cohort.patients) == 8
    assert Counter(p.label for p in cohort.patients.values()) == {"AML": 2, "MDS": 2, "VEXAS": 2, "reactive": 2}
    assert all(1 <= len(cohort.slides_of(pid)) <= 3 for pid in cohort.patient_ids)
    assert {s.view for s in cohort.slides} <= {"PB", "BM"}
    for slide in cohort.slides:
        label = cohort.patients[slide.patient_id].label
        with open(slide.source / "cells.csv", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        pngs = sorted(p.name for p in slide.source.glob("*.png"))
        assert [r["cell_id"] for r in rows] == pngs
        for row in rows:
            assert row["cell_type"] in CELL_TYPES
            if row["diagnostic"] == "1":
                assert row["cell_type"] in DIAGNOSTIC_TYPES[label], (label, row)
        with Image.open(slide.source / pngs[0]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
        assert slide.mpp == pytest.approx(24.0 / 64, abs=1e-3)


def test_cbc_values_are_plausible_and_partly_missing() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_cbc(d, rng, 0.0, 0.1)[0] for d in ("AML", "MDS", "VEXAS", "reactive") for _ in range(200)]
    values = np.array([[row[c] for c in ("wbc", "hb", "mcv", "plt")] for row in draws])
    missing = np.isnan(values).mean()
    assert 0.06 < missing < 0.14
    assert np.nanmin(values[:, 0]) > 0 and np.nanmax(values[:, 1]) < 19 and 65 < np.nanmedian(values[:, 2]) < 110
    mcv = {d: np.nanmedian([sample_cbc(d, rng)[0]["mcv"] for _ in range(300)]) for d in ("MDS", "reactive")}
    assert mcv["MDS"] > mcv["reactive"] + 4  # macrocytosis in MDS (docs/DOMAIN.md)


@pytest.mark.parametrize("difficulty", ["easy", "default", "hard"])
def test_diagnostic_cells_are_a_minority_at_documented_rates(difficulty: str) -> None:
    rng = np.random.default_rng(5)
    differential = np.array([0.6, 0.3, 0.07, 0.02, 0.01])
    for diagnosis in ("MDS", "VEXAS", "reactive"):
        fractions = []
        for _ in range(40):
            state = sample_disease(diagnosis, difficulty, rng)
            cells = slide_cells(state, differential, 400, "PB", rng)
            fractions.append(np.mean([flag for _, flag in cells]))
        low, high = RATES[difficulty][diagnosis]
        assert np.mean(fractions) < 0.5
        assert low * 0.3 < np.median(fractions) < high * 1.1, (diagnosis, np.median(fractions))


def test_renderer_puts_one_stained_cell_in_the_centre_of_every_crop() -> None:
    rng = np.random.default_rng(0)
    stain = Stain.default()
    for cell_type in CELL_TYPES:
        rgb, nucleus = render_crop(cell_type, rng, stain, size=96)
        assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8 and nucleus.shape == (96, 96)
        ys, xs = np.nonzero(nucleus)
        assert len(ys) > 20, cell_type  # a nucleus (or smudged chromatin) is drawn
        assert abs(ys.mean() - 47.5) < 20 and abs(xs.mean() - 47.5) < 20, cell_type  # near the centre
        assert rgb[nucleus].mean() < rgb[~nucleus].mean() - 30, cell_type  # chromatin darker than the rest
    with pytest.raises(ValueError, match="unknown cell type"):
        render_crop("megakaryocyte", rng, stain)


def test_refuses_a_non_empty_folder_and_bad_parameters(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(MilhemaError, match="already exists and is not empty"):
        synthesize_cohort(tmp_path, 2, progress=False)
    with pytest.raises(MilhemaError, match="difficulty"):
        synthesize_cohort(tmp_path / "new", 2, difficulty="extreme", progress=False)
    assert (tmp_path / "x.txt").read_text() == "keep me"


def test_attribute_truth_is_what_the_renderer_draws() -> None:
    """cells.csv's attribute columns follow the rendering: a pseudo-Pelger cell called hypogranular
    has the faint granules of one, and asking does not change the image."""
    from milhema.synth.cells import CELL_ATTRIBUTES, _render_cell, cell_attributes
    from milhema.synth.stain import _GRA

    hypo = CELL_ATTRIBUTES.index("hypogranular")
    granules: dict[int, list[float]] = {0: [], 1: []}
    for seed in range(30):
        rng = np.random.default_rng(seed)
        flag = cell_attributes("pseudo_pelger", rng)[hypo]
        cell = _render_cell("pseudo_pelger", rng, 0.25)
        cytoplasm = (cell.cell > 0.5) & (cell.nucleus < 0.5)
        granules[flag].append(float(cell.dens[_GRA][cytoplasm].mean()))
        again = _render_cell("pseudo_pelger", np.random.default_rng(seed), 0.25)   # without asking first
        assert np.array_equal(again.dens, cell.dens)
    assert len(granules[0]) >= 5 and len(granules[1]) >= 5
    assert max(granules[1]) < min(granules[0])
    assert cell_attributes("blast_auer", np.random.default_rng(0)) == (0, 0, 0, 1)
    assert cell_attributes("vacuolated_monocyte", np.random.default_rng(0)) == (1, 0, 0, 0)
    assert cell_attributes("hypogranular_neutrophil", np.random.default_rng(0)) == (0, 1, 0, 0)
    assert cell_attributes("neutrophil", np.random.default_rng(0)) == (0, 0, 0, 0)


def test_cells_csv_carries_the_attribute_columns(tiny_cohort: Path) -> None:
    for cells_csv in (tiny_cohort / "slides").glob("*/cells.csv"):
        with open(cells_csv, encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            assert reader.fieldnames == ["cell_id", "cell_type", "diagnostic", "vacuoles", "hypogranular",
                                         "pseudo_pelger", "auer_rod"]
            for row in reader:
                assert row["auer_rod"] == str(int(row["cell_type"] == "blast_auer"))
                assert row["vacuoles"] == str(int(row["cell_type"].startswith("vacuolated")))


def test_granulocyte_nuclei_have_the_size_of_real_ones() -> None:
    """Nucleus areas of simulated cells against expert masks of real ones (`../shared/data/wbc-seg`,
    docs/SIMULATION.md): median neutrophil nucleus 39 µm² (camera, n = 176) and 44 µm² (CellaVision,
    n = 33), 5th percentile 29–30 µm², nucleus ÷ cell 0.33–0.37; eosinophils 42 and 59 µm². Until
    2026-11-28 simulated neutrophils had 26 µm² (eosinophils 24 µm²), under the real 5th percentile."""
    from milhema.synth.cells import _render_cell

    rng = np.random.default_rng(7)
    mpp = 0.1
    areas: dict[str, np.ndarray] = {}
    for cell_type in ("neutrophil", "eosinophil", "band"):
        cells = [_render_cell(cell_type, rng, mpp) for _ in range(60)]
        areas[cell_type] = np.array([[(c.nucleus > 0.5).sum(), (c.cell > 0.5).sum()] for c in cells]) * mpp * mpp
    neutrophil = areas["neutrophil"]
    assert 34.0 < np.median(neutrophil[:, 0]) < 48.0
    assert np.percentile(neutrophil[:, 0], 5) > 25.0
    assert 0.25 < np.median(neutrophil[:, 0] / neutrophil[:, 1]) < 0.4
    assert 38.0 < np.median(areas["eosinophil"][:, 0]) < 60.0
    assert np.median(areas["band"][:, 0]) > 28.0    # no real bands in wbc-seg: as much chromatin as a segmented nucleus
