"""Detection calibrated from the image itself: tinted, darker, vignetted, JPEG-compressed smears at
another µm per pixel (what a camera on a microscope gives), built from the simulator's renderers."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from milhema.data.manifest import Slide
from milhema.embed.morphology import segment_cell
from milhema.slides.calibrate import Calibration, calibrate, illumination, optical_density, white_point
from milhema.slides.detect import (
    DETECTOR_VERSION,
    DetectOptions,
    detect_cells,
    recall_precision,
    segment_regions,
)
from milhema.slides.source import open_source
from milhema.slides.wsi import WholeSlide
from milhema.synth.smear import PlacedCell, SmearSpec, plan_smear, render_block
from milhema.synth.stain import Stain

GLASS = np.array([200.0, 190.0, 140.0])   # a yellow lamp without white balance, darker than 255


def _field(mpp: float, size: int, cells: list[tuple[str, float, float]]) -> np.ndarray:
    """A simulated smear field at ``mpp``, as a camera would take it: the light tinted to GLASS,
    vignetted (corners at ~70 %) and JPEG-compressed."""
    stain = replace(Stain.default(), noise_sd=2.0)
    base = plan_smear([], size, size, mpp, (3, 3), stain)
    spec = SmearSpec(size, size, mpp, (3, 3), stain, tuple(PlacedCell(t, False, x, y) for t, x, y in cells), base.tint)
    rgb, _ = render_block(spec, 0, 0, size, size)
    yy, xx = np.mgrid[0:size, 0:size]
    r2 = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 2) ** 2)
    light = GLASS / 255.0 * np.exp(-0.35 * r2)[..., None]
    camera = np.clip(rgb.astype(np.float64) * light + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(camera).save(buffer, format="JPEG", quality=85)
    return np.asarray(Image.open(buffer).convert("RGB"))


CELLS = [("neutrophil", 300.0, 260.0), ("lymphocyte", 700.0, 300.0), ("monocyte", 480.0, 700.0),
         ("blast", 820.0, 800.0)]


@pytest.fixture(scope="module")
def camera_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat TIFF of a 1024 px camera field at 0.2 µm/px with four white cells."""
    path = tmp_path_factory.mktemp("camera") / "field.tiff"
    tifffile.imwrite(path, _field(0.2, 1024, CELLS), photometric="rgb", tile=(256, 256))
    return path


def test_white_point_and_vignetting_are_measured_on_the_image() -> None:
    rgb = _field(0.2, 1024, CELLS)
    white = white_point(rgb)
    # The glass at the centre of the field (vignetting darkens only the corners).
    assert np.abs(white - GLASS * 0.98).max() < 12
    gain = illumination(rgb, white)
    assert gain[512, 512] == pytest.approx(1.0, abs=0.02)
    assert 0.6 < gain[0, 0] < 0.85      # the corners get ~70 % of the light
    even = np.full((256, 256, 3), 230, np.uint8)
    assert (illumination(even, white_point(even)) == 1.0).all()   # an evenly lit field is left alone


def test_tinted_vignetted_jpeg_field_is_detected(camera_scan: Path) -> None:
    slide = WholeSlide("F", camera_scan, mpp_override=0.2)
    found = detect_cells(slide, DetectOptions(progress=False))
    truth = np.array([(x, y) for _, x, y in CELLS])
    recall, precision, _ = recall_precision(truth, found.centres.astype(float), 5.0 / slide.mpp)
    assert recall == 1.0 and precision == 1.0
    cal = Calibration.from_dict(found.calibration)
    assert cal.mpp == pytest.approx(0.2)
    assert np.abs(np.array(cal.white) - GLASS).max() < 15
    # The nuclear stain absorbs red and green light much more than blue (violet).
    assert cal.nuclear[1] > cal.nuclear[2] and cal.nuclear[0] > cal.eosin[0]


def test_calibration_is_recorded_in_the_detection_json(camera_scan: Path, tmp_path: Path) -> None:
    source = open_source(Slide("F", "P", camera_scan, mpp=0.2), tmp_path / "detections", 24.0,
                         detect_options=DetectOptions(progress=False))
    meta = json.loads((tmp_path / "detections" / "F.json").read_text())
    assert meta["calibration"]["mpp"] == pytest.approx(0.2)
    assert len(meta["calibration"]["white"]) == 3 and f'"version": {DETECTOR_VERSION}' in meta["signature"]
    assert source.calibration == meta["calibration"]
    again = open_source(Slide("F", "P", camera_scan, mpp=0.2), tmp_path / "detections", 24.0,
                        detect_options=DetectOptions(progress=False))
    assert again.calibration == meta["calibration"]     # reloaded from the cache with the cells


def test_morphology_segments_a_crop_of_a_tinted_field() -> None:
    rgb = _field(0.2, 1024, CELLS)
    x, y = 700, 300   # the lymphocyte: a round nucleus of ~7 µm
    crop = rgb[y - 60:y + 60, x - 60:x + 60]
    cell, nucleus = segment_cell(crop, 0.2, calibrate(rgb, 0.2))
    assert nucleus[60, 60] and cell[60, 60]
    area = nucleus.sum() * 0.2 ** 2
    assert 15 < area < 80 and cell.sum() >= nucleus.sum()


def _found_in_profile(tmp_path: Path, acquisition: str, kind: str) -> tuple[int, int]:
    """(true white cells, cells found) over the scans or fields of one simulated patient (seed 2026,
    15 cells per slide) at 0.5 µm/px, each image detected as ``milhema embed`` detects it; every
    detection must be a true white cell."""
    from milhema.slides.fields import FieldImage
    from milhema.slides.source import field_options
    from milhema.slides.wsi import read_scan_truth, truth_path
    from milhema.synth import synthesize_cohort

    cohort = synthesize_cohort(tmp_path / "c", 1, seed=2026, cells_per_slide=15, acquisition=acquisition, mpp=0.5,
                               wsi=kind == "scan", fields=kind == "fields", workers=1, progress=False)
    slides = cohort / "slides"
    images: list[WholeSlide] = (
        [WholeSlide(p.stem, p) for p in sorted(slides.glob("*.tiff"))] if kind == "scan"
        else [FieldImage(p.parent.name, p, mpp_override=0.5) for p in sorted(slides.glob("*/*.jpg"))])
    options = DetectOptions(progress=False)
    truth, found = 0, 0
    for image in images:
        detections = detect_cells(image, options if kind == "scan" else field_options(options))
        xy, _, _ = read_scan_truth(truth_path(image.path), image.slide_id)
        recall, precision, _ = recall_precision(xy, detections.centres.astype(float), 5.0 / image.mpp)
        assert precision == 1.0, f"{image.path.name}: a detection that is no white cell"
        truth += len(xy)
        found += round(recall * len(xy))
    return truth, found


def _red_cells_and_platelet(with_lymphocyte: bool) -> tuple[np.ndarray, Calibration]:
    """A 48 µm scan tile at 0.08 µm/px (Beer-Lambert, camera-dim-like glass): red cells, two pairs
    and a pile of three overlapping, a platelet lying on one; optionally a lymphocyte on free glass.
    With the slide's calibration (measured elsewhere on the slide, where the white cells are)."""
    mpp, size = 0.08, 600
    nuclear = np.array([0.5466, 0.7839, 0.2944])
    eosin = np.array([0.0077, 0.6992, 0.7149])
    yy, xx = np.mgrid[0:size, 0:size] * mpp
    od = np.zeros((size, size, 3))

    def disc(x: float, y: float, radius: float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp((np.hypot(xx - x, yy - y) - radius) / 0.15))   # soft edge, µm

    for x, y in [(8, 8), (12, 9), (8, 30), (11.5, 33), (30, 12), (34, 14), (32, 17.5)]:
        pallor = 1.0 - 0.3 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.8 ** 2))
        od += 0.7 * (disc(x, y, 3.75) * pallor)[..., None] * eosin
    od += 0.9 * disc(8.5, 29, 1.0)[..., None] * nuclear               # a platelet on a red cell
    if with_lymphocyte:
        od += 0.25 * disc(36, 38, 5.0)[..., None] * np.array([0.45, 0.6, 0.3])   # pale blue cytoplasm
        od += 1.3 * disc(36, 38, 3.5)[..., None] * nuclear
    white = np.array([169.0, 159.0, 171.0])
    rng = np.random.default_rng(0)
    rgb = np.clip(white * np.exp(-od) + rng.normal(0, 1.5, od.shape), 0, 255).astype(np.uint8)
    cal = Calibration(white=tuple(white), nuclear=tuple(nuclear), eosin=tuple(eosin), nucleus_od=0.835,
                      stained_od=0.093, noise_od=0.0155, mpp=mpp, pixels=size * size)
    return rgb, cal


def test_overlapping_red_cells_in_a_tile_without_a_nucleus_are_no_white_cell() -> None:
    """Where red cells overlap, twice their OD passes the slide's chromatin density. In a tile with
    no nucleus those overlaps were all its dense pixels, and detector 7 took their hue for
    chromatin's: every stained pixel then passed for chromatin, and a pile of red cells with a
    platelet on it was a white cell (the debris on the camera-dim and wright-pale scans at 0.08
    µm/px). Chromatin keeps the hue of the slide's nuclear stain there."""
    options = DetectOptions(progress=False)
    rgb, cal = _red_cells_and_platelet(with_lymphocyte=False)
    chromatin = optical_density(rgb, cal.white_array) @ np.array(cal.nuclear)
    assert (chromatin > cal.nucleus_od).sum() * 0.08 ** 2 > 14     # overlaps dense enough for a nucleus
    assert len(segment_regions(rgb, 0.08, options, cal).centres) == 0
    rgb, cal = _red_cells_and_platelet(with_lymphocyte=True)
    found = segment_regions(rgb, 0.08, options, cal)
    assert len(found.centres) == 1 and np.hypot(*(found.centres[0] * 0.08 - (36, 38))) < 1.0


def test_segmented_neutrophils_at_coarse_pixels_are_found(tmp_path: Path) -> None:
    """At 0.5 µm/px a neutrophil's lobes are pieces of a few px that neither chromatin nor a basin of
    the cell joins (a waist splits the cell between them): the cell is still one white cell
    (detector 4 missed 3 of these 54 cells, all isolated neutrophils or eosinophils: recall 0.94,
    under the 0.95 of issue 16). Detector 7 finds 52: it misses one isolated eosinophil, as 5 and 6
    did, and a neutrophil pressed against a lymphocyte, whose nuclei, with its edges now kept, blur
    into one piece of chromatin at this pixel size (one detection for the two)."""
    truth, found = _found_in_profile(tmp_path, "scanner-40x", "scan")
    assert truth == 54 and found >= 52


def test_a_nucleus_cut_by_its_cells_waist_is_one_cell_and_touching_nuclei_two() -> None:
    """Two round bodies joined by a waist. A band-shaped nucleus crossing the waist at its full width
    is one cell's (a band or lobed neutrophil at 0.08 µm/px, split in two by detector 4); two round
    nuclei that only touch are two cells."""
    from milhema.slides.detect import _nucleated_pieces

    yy, xx = np.mgrid[0:60, 0:100]
    region = (np.hypot(yy - 30, xx - 30) < 20) | (np.hypot(yy - 30, xx - 66) < 20)
    band = region & (np.abs(yy - 30) <= 4) & (xx > 16) & (xx < 80)
    assert len(_nucleated_pieces(region, band, 60, 100, 5, 0.9)) == 1
    touching = (np.hypot(yy - 30, xx - 39) < 9) | (np.hypot(yy - 30, xx - 57) < 9)
    assert len(_nucleated_pieces(region, touching & region, 60, 100, 5, 0.9)) == 2


def test_small_nuclei_under_a_quick_stain_and_a_yellow_lamp_keep_their_edges(tmp_path: Path) -> None:
    """Camera fields at 0.5 µm/px (``camera-yellow``: rapid stain, yellow lamp, JPEG 75): the pale red
    cells' hue is mostly noise, which detector 6 counted twice (in the red cells' spread and per
    pixel), so the edges of small nuclei were not chromatin and lymphocytes fell under the cell size
    (recall 0.81 on these 54 cells; one field lost 10 of its 18). Taking the noise out of the red
    cells' spread keeps them, and still no platelet or red cell is counted."""
    truth, found = _found_in_profile(tmp_path, "camera-yellow", "fields")
    assert truth == 54 and found >= 52
