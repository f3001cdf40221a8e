"""Whole-slide path: simulated scans, reading through tiffslide, detection, crops into bags, cv."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile

from milhema.bags import read_bag, validate_bag
from milhema.cli import main
from milhema.data.manifest import load_cohort
from milhema.embed.pipeline import EmbedOptions, embed_cohort
from milhema.slides.detect import DetectOptions, detect_cells, match_points, recall_precision, segment_cells
from milhema.slides.wsi import SlideReadError, WholeSlide, read_scan_truth
from milhema.synth.smear import PlacedCell, SmearSpec, plan_smear, render_block, write_smear
from milhema.synth.stain import Stain

CLASSES = ("AML", "MDS", "VEXAS", "reactive")


@pytest.fixture(scope="module")
def wsi_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 patients (2 per class), each slide a 1024 × 1024 px scan with ~14 white cells."""
    from milhema.synth import synthesize_cohort

    out = tmp_path_factory.mktemp("wsi") / "cohort"
    return synthesize_cohort(out, n_patients=8, seed=5, cells_per_slide=14, wsi=True, wsi_size=1024, workers=2,
                             progress=False)


def _spec(cells: list[PlacedCell], width: int = 1536, height: int = 1024, noise: float = 2.0) -> SmearSpec:
    stain = replace(Stain.default(), noise_sd=noise)
    base = plan_smear([], width, height, 0.25, (9, 9), stain)
    return SmearSpec(width, height, 0.25, (9, 9), stain, tuple(cells), base.tint)


def test_scan_opens_with_mpp_levels_and_truth(wsi_cohort: Path) -> None:
    scans = sorted((wsi_cohort / "slides").glob("*.tiff"))
    assert scans, "no scans written"
    slide = WholeSlide("S", scans[0])
    assert slide.mpp == pytest.approx(0.25)
    assert slide.dimensions == (1024, 1024)
    assert slide.level_downsamples == (1.0, 4.0)
    assert slide.level_dimensions[1] == (256, 256)
    region = slide.read(100, 200, 64, 48)
    assert region.shape == (48, 64, 3) and region.dtype == np.uint8
    # The smear is mostly pink red cells over light glass, never black.
    assert 120 < region.mean() < 250
    assert (slide.read(-40, -40, 32, 32) == 255).all()   # outside the slide: white glass
    rng = np.random.default_rng(0)
    for _ in range(40):   # the block cache returns exactly what a direct read does, edges included
        x, y = (int(v) for v in rng.integers(-100, 1100, 2))
        w, h = (int(v) for v in rng.integers(1, 600, 2))
        assert np.array_equal(slide.read_cached(x, y, w, h), slide.read(x, y, w, h))
    xy, types, diag = read_scan_truth(scans[0].with_name(scans[0].stem + ".cells.csv"), "S")
    assert len(xy) == len(types) == len(diag) > 0
    assert ((xy > 0) & (xy < 1024)).all()
    manifest = (wsi_cohort / "slides.csv").read_text().splitlines()
    assert manifest[1].split(",")[2].endswith(".tiff")


def test_rendering_is_seamless_and_independent_of_workers(tmp_path: Path) -> None:
    spec = _spec([PlacedCell("neutrophil", False, 512.0, 300.0), PlacedCell("blast", True, 1000.0, 700.0)])
    rows1 = write_smear(tmp_path / "a.tiff", spec, workers=1)
    rows2 = write_smear(tmp_path / "b.tiff", spec, workers=2)
    assert rows1 == rows2
    a = tifffile.imread(tmp_path / "a.tiff")
    b = tifffile.imread(tmp_path / "b.tiff")
    assert np.array_equal(a, b)
    # A block rendered on its own equals the same pixels cut from a bigger block: no seams (sensor
    # noise, drawn per block, is switched off for this comparison).
    quiet = _spec(list(spec.cells), noise=0.0)
    whole, _ = render_block(quiet, 256, 128, 768, 512)
    part, _ = render_block(quiet, 512, 256, 256, 256)
    assert np.abs(whole[128:384, 256:512].astype(int) - part.astype(int)).max() <= 1
    # Truth box holds the centre, and the cell is dark in the scan where the truth says it is.
    _, x, y, x0, y0, x1, y1, cell_type, diagnostic = rows1[1]
    assert x0 < x < x1 and y0 < y < y1 and cell_type == "blast" and diagnostic == 1
    assert a[y - 4:y + 4, x - 4:x + 4, 0].mean() < 170


def test_cells_on_tile_borders_are_found_once(tmp_path: Path) -> None:
    # Tiles of 512 px: a cell on a vertical border, one on a horizontal border, one on a 4-tile corner.
    planted = [(512.0, 300.0), (800.0, 512.0), (1024.0, 512.0), (250.0, 760.0)]
    spec = _spec([PlacedCell("lymphocyte" if i % 2 else "neutrophil", False, x, y)
                  for i, (x, y) in enumerate(planted)])
    write_smear(tmp_path / "s.tiff", spec)
    slide = WholeSlide("S", tmp_path / "s.tiff")
    found = detect_cells(slide, DetectOptions(tile_px=512, progress=False))
    assert len(found) == len(planted)
    pairs = match_points(np.array(planted), found.centres.astype(float), 5.0 / slide.mpp)
    assert len(pairs) == len(planted)
    for x0, y0, x1, y1 in found.bboxes:
        assert 20 < x1 - x0 < 100 and 20 < y1 - y0 < 100   # 5–25 µm boxes
    assert found.qc["tiles"] >= 4 and found.qc["scanned_mm2"] > 0
    assert "4 cells" in found.qc_line("S")


def test_touching_cells_are_split_and_debris_is_not_a_cell() -> None:
    spec = _spec([PlacedCell("neutrophil", False, 300.0, 300.0), PlacedCell("monocyte", False, 366.0, 300.0),
                  PlacedCell("lymphocyte", False, 700.0, 600.0)], width=1024)
    rgb, _ = render_block(spec, 0, 0, 1024, 1024)
    centres, boxes, scores = segment_cells(rgb, 0.25)
    assert len(centres) == 3
    assert len(match_points(np.array([(300.0, 300.0), (366.0, 300.0), (700.0, 600.0)]), centres, 20.0)) == 3
    assert ((scores > 0) & (scores <= 1)).all()
    empty, _ = render_block(_spec([], width=1024), 0, 0, 1024, 1024)   # platelets and precipitate only
    assert len(segment_cells(empty, 0.25)[0]) == 0


def test_detection_finds_the_planted_cells_of_a_cohort(wsi_cohort: Path) -> None:
    truth_n = found_n = matched = 0
    for scan in sorted((wsi_cohort / "slides").glob("*.tiff")):
        slide = WholeSlide(scan.stem, scan)
        found = detect_cells(slide, DetectOptions(progress=False))
        xy, _, _ = read_scan_truth(scan.with_name(scan.stem + ".cells.csv"), scan.stem)
        _, _, n = recall_precision(xy, found.centres.astype(float), 5.0 / slide.mpp)
        truth_n, found_n, matched = truth_n + len(xy), found_n + len(found), matched + n
    assert matched / truth_n >= 0.9
    assert matched / found_n >= 0.9


def test_unreadable_and_mpp_less_slides_fail_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tiff"
    bad.write_bytes(b"this is not a TIFF file" * 10)
    with pytest.raises(SlideReadError, match="slide S1: bad.tiff is not a readable whole-slide image"):
        WholeSlide("S1", bad)
    with pytest.raises(SlideReadError, match="does not exist"):
        WholeSlide("S1", tmp_path / "missing.svs")
    plain = tmp_path / "plain.tiff"
    tifffile.imwrite(plain, np.full((600, 700, 3), 230, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(SlideReadError, match="no microns-per-pixel .* add an 'mpp' column to slides.csv"):
        WholeSlide("S2", plain)
    assert WholeSlide("S2", plain, mpp_override=0.5).mpp == 0.5

    # Through the CLI: one line, exit status 2.
    (tmp_path / "patients.csv").write_text("patient_id,label\nP1,AML\n")
    (tmp_path / "slides.csv").write_text("slide_id,patient_id,source\nS1,P1,bad.tiff\n")
    assert main(["embed", "--cohort", str(tmp_path), "--out", str(tmp_path / "bags"), "--backbone", "none",
                 "--morphology", "-q"]) == 2
    (tmp_path / "slides.csv").write_text("slide_id,patient_id,source\nS1,P1,plain.tiff\n")
    assert main(["embed", "--cohort", str(tmp_path), "--out", str(tmp_path / "bags"), "--backbone", "none",
                 "--morphology", "-q"]) == 2


def test_wsi_cohort_embed_resume_and_cv(wsi_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort = load_cohort(wsi_cohort, CLASSES, ())
    bags = tmp_path / "bags"
    report = embed_cohort(cohort, bags, EmbedOptions(backbone="none", morphology=True, workers=2, progress=False))
    assert len(report.written) == len(cohort.slides) and len(report.detections) == len(cohort.slides)
    first = cohort.slides[0]
    bag = read_bag(bags / f"{first.slide_id}.h5")
    validate_bag(bags / f"{first.slide_id}.h5")
    assert bag.n_cells > 5
    assert np.isfinite(bag.coords).all() and bag.bboxes is not None
    assert (bag.bboxes[:, 0] <= bag.coords[:, 0]).all() and (bag.coords[:, 0] <= bag.bboxes[:, 2]).all()
    assert bag.thumbnails is not None and bag.thumbnails.shape[1:] == (64, 64, 3)
    assert bag.cell_ids[0] == f"{round(float(bag.coords[0, 0]))}_{round(float(bag.coords[0, 1]))}"
    assert bag.attrs["mpp"] == pytest.approx(0.25) and bag.attrs["crop_px"] == 96   # 24 µm at 0.25 µm/px
    assert bag.cell_types is not None and sum(t != "unmatched" for t in bag.cell_types) >= 0.9 * bag.n_cells
    meta = json.loads((bags / "detections" / f"{first.slide_id}.json").read_text())
    assert meta["qc"]["tiles"] >= 1

    # Loader workers each open the scan themselves: the same features as reading in one process.
    serial = embed_cohort(load_cohort(wsi_cohort, CLASSES, ()), tmp_path / "serial",
                          EmbedOptions(backbone="none", morphology=True, workers=0, progress=False, shard=(0, 4)))
    for slide_id in serial.written:
        assert np.array_equal(read_bag(tmp_path / "serial" / f"{slide_id}.h5").features,
                              read_bag(bags / f"{slide_id}.h5").features)

    # Resume: nothing embedded or detected again.
    stamp = (bags / "detections" / f"{first.slide_id}.csv").stat().st_mtime_ns
    again = embed_cohort(cohort, bags, EmbedOptions(backbone="none", morphology=True, workers=0, progress=False))
    assert again.written == [] and len(again.skipped) == len(cohort.slides)
    assert (bags / "detections" / f"{first.slide_id}.csv").stat().st_mtime_ns == stamp

    code = main(["cv", "--cohort", str(wsi_cohort), "--bags", str(bags), "--out", str(tmp_path / "run"),
                 "--folds", "2", "--set", "train.epochs=3", "--set", "train.batch_size=4", "-q"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_patients"] == 8 and 0.0 <= metrics["patient"]["balanced_accuracy"]["mean"] <= 1.0
