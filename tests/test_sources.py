"""Where cells come from besides the stain detector: registered detectors, external detections
(QuPath GeoJSON, CSV) and folders of photographed fields, through the real command line on
simulated scans (``milhema synth --wsi``) and fields cut out of them."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milhema.bags import read_bag
from milhema.cli import main
from milhema.data.manifest import load_cohort
from milhema.errors import ManifestError
from milhema.slides import detectors
from milhema.slides.detect import Detections, DetectOptions
from milhema.slides.external import read_geojson
from milhema.slides.wsi import WholeSlide, read_scan_truth

CLASSES = ["AML", "MDS", "VEXAS", "reactive"]
EMBED = ["--backbone", "none", "--morphology", "--workers", "0", "-q"]
MPP = 0.25   # the simulator's scans


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 simulated patients, one 1024 px scan each (~12 white cells), with truth files."""
    out = tmp_path_factory.mktemp("sources") / "cohort"
    assert main(["synth", "--out", str(out), "--patients", "4", "--seed", "5", "--cells", "12", "--wsi",
                 "--acquisition", "default", "--wsi-size", "1024", "--workers", "2", "-q"]) == 0
    return out


def _scan(scans: Path) -> tuple[Path, np.ndarray, list[str]]:
    """The scan of the cohort with the most planted cells, its truth centres [n, 2] and types."""
    found = []
    for path in sorted((scans / "slides").glob("*.tiff")):
        xy, types, _ = read_scan_truth(path.with_name(path.stem + ".cells.csv"), path.stem)
        found.append((len(xy), path.name, path, xy, types))
    _, _, path, xy, types = max(found)
    return path, xy, types


def _cohort(root: Path, rows: list[str], header: str = "slide_id,patient_id,source") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "patients.csv").write_text("patient_id,label\nP1,AML\nP2,MDS\n")
    (root / "slides.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("milhema: error: ") and "Traceback" not in err, err
    return lines[0]


def _by_id(bag_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None, str]]:
    bag = read_bag(bag_path, thumbnails=False)
    types = bag.cell_types if bag.cell_types is not None else [""] * bag.n_cells
    return {str(c): (bag.coords[i], None if bag.bboxes is None else bag.bboxes[i], str(types[i]))
            for i, c in enumerate(bag.cell_ids)}


def test_scan_truth_attributes_reach_the_bags(scans: Path, tmp_path: Path) -> None:
    """The 0/1 columns of a scan's truth file are the detected cells' annotated attributes (-1 unmatched)."""
    bags = tmp_path / "bags"
    assert main(["embed", "--cohort", str(scans), "--out", str(bags), *EMBED]) == 0
    checked = 0
    for path in sorted(bags.glob("*.h5")):
        bag = read_bag(path, thumbnails=False)
        assert bag.attribute_label_names == ("vacuoles", "hypogranular", "pseudo_pelger", "auer_rod")
        for types, labels in zip(bag.cell_types, bag.attribute_labels, strict=True):
            if types == "unmatched":
                assert labels.tolist() == [-1, -1, -1, -1]
            else:
                assert labels[3] == int(types == "blast_auer") and labels[0] == int(types.startswith("vacuolated"))
                checked += 1
    assert checked >= 20


def test_attribute_columns_of_an_annotation_export(tmp_path: Path) -> None:
    """Any other 0/1 column of cells.csv is an attribute (empty = not annotated); a score column is not."""
    from milhema.slides.crops import list_crops

    folder = tmp_path / "S1"
    (folder / "Blast").mkdir(parents=True)
    for name in ("Blast/a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    (folder / "cells.csv").write_text("cell_id,cell_type,Auer rod,score,vacuoles\nBlast/a.png,,1,0.7,\n"
                                      "b.png,neutrophil,0,0.2,true\n")
    crops = list_crops("S1", folder)
    assert crops.attribute_names == ("Auer rod", "vacuoles")
    assert crops.attribute_labels == ((1, -1), (0, 1), (-1, -1))   # c.png has no row


# --- registry ----------------------------------------------------------------------------------

GRID = [(x, y) for y in (200.0, 500.0, 800.0) for x in (200.0, 500.0, 800.0)]


def _grid(slide: WholeSlide, options: DetectOptions) -> Detections:
    centres = np.array(GRID, np.float32)
    boxes = np.array([(x - 20, y - 20, x + 20, y + 20) for x, y in GRID], np.int32)
    return Detections(centres, boxes, np.full(len(GRID), 0.5, np.float32), {"seconds": 0.0}).order()


def test_registered_detector_through_the_cli(scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detectors, "_REGISTRY", dict(detectors._REGISTRY))   # undone after the test
    detectors.register_detector("grid_test", version=3, settings=lambda o: {"min_cell_um2": o.min_cell_um2})(_grid)
    names = detectors.list_detectors()
    assert {"external", "grid_test", "stain"} <= set(names) and names == sorted(names)
    with pytest.raises(ValueError, match="already registered"):
        detectors.register_detector("stain")(_grid)
    scan, _, _ = _scan(scans)
    cohort = _cohort(tmp_path / "c", [f"S1,P1,{scan}"])
    bags = tmp_path / "bags"
    assert main(["embed", "--cohort", str(cohort), "--out", str(bags), "--detector", "grid_test", *EMBED]) == 0
    cells = _by_id(bags / "S1.h5")
    assert sorted(cells) == sorted(f"{x:.0f}_{y:.0f}" for x, y in GRID)
    for x, y in GRID:
        assert cells[f"{x:.0f}_{y:.0f}"][0].tolist() == [x, y]
    signature = {"detector": "grid_test", "version": 3, "min_cell_um2": 40.0}
    assert json.loads(json.loads((bags / "detections" / "S1.json").read_text())["signature"]) == signature
    made = json.loads(read_bag(bags / "S1.h5").attrs["embed_signature"])
    assert made["detector"] == "grid_test" and json.loads(made["detect"]) == signature

    # Another detector on the same folder is another embedding: refused, then redone with --overwrite.
    line = _one_line_error(["embed", "--cohort", str(cohort), "--out", str(bags), *EMBED], capsys)
    assert "was embedded with other settings" in line and "--overwrite" in line
    assert main(["embed", "--cohort", str(cohort), "--out", str(bags), "--overwrite", *EMBED]) == 0
    stain = json.loads(json.loads((bags / "detections" / "S1.json").read_text())["signature"])
    assert stain["detector"] == "stain" and stain["version"] >= 2 and "workers" not in stain
    assert sorted(_by_id(bags / "S1.h5")) != sorted(cells)

    line = _one_line_error(["embed", "--cohort", str(cohort), "--out", str(tmp_path / "b2"), "--detector",
                            "grid_tset", *EMBED], capsys)
    assert line == (f"milhema: error: detector 'grid_tset' is not registered; available: {', '.join(names)} "
                    "(did you mean 'grid_test'?)")
    assert not (tmp_path / "b2").exists()


# --- external detections -----------------------------------------------------------------------

def _polygon(x: float, y: float, r: float = 18.0) -> list[list[float]]:
    """A closed regular hexagon around (x, y): its area centroid is (x, y)."""
    ring = [[x + r * math.cos(a), y + r * math.sin(a)] for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
    return [*ring, ring[0]]


def _feature(geometry: dict, kind: str = "detection", cls: str | None = None) -> dict:
    properties: dict = {"objectType": kind}
    if cls is not None:
        properties["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


@pytest.fixture()
def external(scans: Path, tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A cohort of two copies of one scan (no truth file beside them): A with a GeoJSON, B with a CSV."""
    scan, xy, _ = _scan(scans)
    root = _cohort(tmp_path / "ext", ["A,P1,A.tiff", "B,P2,B.tiff"])
    shutil.copy(scan, root / "A.tiff")
    shutil.copy(scan, root / "B.tiff")
    assert len(xy) >= 9
    features = [_feature({"type": "Point", "coordinates": list(xy[i])}, cls="Blast" if i % 2 else "Neutrophil")
                for i in range(4)]
    features += [_feature({"type": "Polygon", "coordinates": [_polygon(*xy[i])]}, kind="cell", cls="Monocyte")
                 for i in range(4, 7)]
    # A QuPath points annotation (one class for its points) and the region the cells were found in.
    features.append(_feature({"type": "MultiPoint", "coordinates": [list(xy[7]), list(xy[8])]},
                             kind="annotation", cls="Lymphocyte"))
    features.append(_feature({"type": "Polygon", "coordinates": [[[0, 0], [1000, 0], [1000, 1000], [0, 1000],
                                                                  [0, 0]]]}, kind="annotation"))
    (root / "A.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with open(root / "B.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x", "y", "x0", "y0", "x1", "y1", "Class"])
        for i, (x, y) in enumerate(xy):
            writer.writerow([f"{x:.2f}", f"{y:.2f}", int(x) - 15, int(y) - 12, int(x) + 16, int(y) + 13, f"type{i}"])
    return root, xy


def test_external_geojson_and_csv_are_the_cells_of_the_bags(external: tuple[Path, np.ndarray], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root, xy = external
    bags = tmp_path / "bags"
    assert main(["embed", "--cohort", str(root), "--out", str(bags), "--detector", "external", *EMBED]) == 0
    a = _by_id(bags / "A.h5")
    assert len(a) == 9   # 4 points + 3 polygons + 2 annotation points; the region annotation is no cell
    half = 12.0 / MPP / 2   # a point's box: 12 µm
    for i in range(9):
        x, y = xy[i]
        coords, box, cell_type = a[f"{round(x)}_{round(y)}"]
        assert coords == pytest.approx([x, y], abs=0.01)
        want = "Neutrophil" if i < 4 and i % 2 == 0 else "Blast" if i < 4 else "Monocyte" if i < 7 else "Lymphocyte"
        assert cell_type == want
        if 4 <= i < 7:   # a polygon's box is its extent
            assert box.tolist() == [math.floor(x - 18), math.floor(y - 18 * math.sin(math.pi / 3)),
                                    math.floor(x + 18) + 1, math.floor(y + 18 * math.sin(math.pi / 3)) + 1]
        else:
            assert box.tolist() == [math.floor(x - half), math.floor(y - half), math.ceil(x + half),
                                    math.ceil(y + half)]
    b = _by_id(bags / "B.h5")
    assert len(b) == len(xy)
    for i, (x, y) in enumerate(xy):
        coords, box, cell_type = b[f"{round(x)}_{round(y)}"]
        assert coords == pytest.approx([x, y], abs=0.01) and cell_type == f"type{i}"
        assert box.tolist() == [int(x) - 15, int(y) - 12, int(x) + 16, int(y) + 13]
    bag = read_bag(bags / "B.h5")
    assert bag.thumbnails is not None and bag.thumbnails.shape == (len(xy), 64, 64, 3)
    assert bag.thumbnails.mean() < 235   # cut from the scan where the cells are, not blank glass
    made = json.loads(json.loads(bag.attrs["embed_signature"])["detect"])
    assert made["detector"] == "external" and made["inputs"][0][0] == "B.csv" and len(made["inputs"][0][1]) == 64

    # Edited detections are new settings: refused in one line, then read again with --overwrite.
    (root / "B.csv").write_text("x,y\n100,100\n")
    line = _one_line_error(["embed", "--cohort", str(root), "--out", str(bags), "--detector", "external", *EMBED],
                           capsys)
    assert "B.h5 was embedded with other settings" in line
    assert main(["embed", "--cohort", str(root), "--out", str(bags), "--detector", "external", "--overwrite",
                 *EMBED]) == 0
    assert list(_by_id(bags / "B.h5")) == ["100_100"]
    assert read_bag(bags / "B.h5").cell_types is None   # no class column: no types


BAD_EXTERNAL = {
    "no file": (lambda root: (root / "A.geojson").unlink(),
                "slide A: no external detections for A.tiff: expected A.geojson or A.csv beside it"),
    "two files": (lambda root: (root / "A.csv").write_text("x,y\n1,1\n"),
                  "slide A: both A.geojson and A.csv are beside A.tiff; keep the one that holds its cells"),
    "not JSON": (lambda root: (root / "A.geojson").write_text('{"type": "FeatureCollection", '),
                 "slide A: A.geojson is not valid JSON (line 1 column"),
    "line geometry": (lambda root: (root / "A.geojson").write_text(json.dumps(_feature(
        {"type": "LineString", "coordinates": [[1, 1], [5, 5]]}))),
        "slide A: A.geojson feature 1: geometry 'LineString' is not a Point, MultiPoint, Polygon or MultiPolygon"),
    "not features": (lambda root: (root / "A.geojson").write_text('{"cells": []}'),
                     "slide A: A.geojson is not a GeoJSON FeatureCollection, Feature or list of Features"),
    "csv without x": (lambda root: (root / "B.csv").write_text("cx,cy\n1,2\n"),
                      "slide B: B.csv has no 'x' and 'y' columns (found: cx, cy)"),
    "csv text": (lambda root: (root / "B.csv").write_text("x,y\n1,2\nten,4\n"),
                 "slide B: B.csv row 3: x 'ten' is not a number"),
    "csv in µm": (lambda root: (root / "B.csv").write_text("x,y\n10,20\n2500.5,30\n"),
                  "slide B: B.csv: 1 cell(s) outside the 1024 × 1024 px image B.tiff (first at x 2500.5, y 30.0); "
                  "positions must be pixels of the full-resolution image, not µm"),
    "same cell twice": (lambda root: (root / "B.csv").write_text("x,y\n10,20\n10.2,19.9\n"),
                        "slide B: B.csv row 3: the same cell as row 2 (x 10, y 20); list each cell once"),
}


@pytest.mark.parametrize("case", list(BAD_EXTERNAL))
def test_malformed_external_detections_are_one_line(case: str, external: tuple[Path, np.ndarray], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = external
    spoil, message = BAD_EXTERNAL[case]
    spoil(root)
    out = tmp_path / "bags"
    line = _one_line_error(["embed", "--cohort", str(root), "--out", str(out), "--detector", "external", *EMBED],
                           capsys)
    assert line == f"milhema: error: {message}" or line.startswith(f"milhema: error: {message}"), line
    assert not list(out.glob("*.h5"))


def test_geojson_shapes_qupath_writes(tmp_path: Path) -> None:
    path = tmp_path / "f.geojson"
    # One Feature alone; a list of Features (QuPath without "FeatureCollection"); a derived class.
    path.write_text(json.dumps(_feature({"type": "Point", "coordinates": [10.5, 20.5]}, cls="Blast")))
    found = read_geojson(path, "S", MPP)
    assert found.centres.tolist() == [[10.5, 20.5]] and found.cell_types == ["Blast"]
    square = {"type": "MultiPolygon", "coordinates": [[[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]],
                                                      [[[20, 0], [30, 0], [30, 10], [20, 10], [20, 0]]]]}
    path.write_text(json.dumps([_feature(square), {"type": "Feature", "geometry": {"type": "Point", "coordinates":
                                [50, 60]}, "properties": {"classification": {"name": ["Tumor", "Positive"]}}}]))
    found = read_geojson(path, "S", MPP)
    assert found.centres.tolist() == [[15.0, 5.0], [50.0, 60.0]]
    assert found.bboxes[0].tolist() == [0, 0, 31, 11] and found.cell_types == ["", "Tumor: Positive"]


# --- photographed fields -----------------------------------------------------------------------

FIELD_FILES = ("field_0.png", "field_1.jpg", "field_2.tif")
FIELD_SIZES = ((400, 360), (360, 400), (420, 420))   # (width, height): not square, so x and y cannot swap


@pytest.fixture(scope="module")
def fields(scans: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Each patient's scan cut into 3 photographed fields (PNG, JPEG, TIFF) with their truth, embedded,
    trained on and explained; returns (cohort, bags, explain folder)."""
    root = tmp_path_factory.mktemp("fields")
    cohort = root / "cohort"
    (cohort / "fields").mkdir(parents=True)
    shutil.copy(scans / "patients.csv", cohort / "patients.csv")
    rows = []
    with open(scans / "slides.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            scan = scans / row["source"]
            xy, types, diag = read_scan_truth(scan.with_name(scan.stem + ".cells.csv"), scan.stem)
            folder = cohort / "fields" / row["slide_id"]
            folder.mkdir()
            slide = WholeSlide(row["slide_id"], scan)
            order = np.argsort(xy[:, 1] * 4096 + xy[:, 0])
            for k, (name, (w, h)) in enumerate(zip(FIELD_FILES, FIELD_SIZES, strict=True)):
                # Centred on a planted cell, so every field holds at least one whole cell.
                cx, cy = xy[order[3 * k]]
                x0 = int(np.clip(cx - w / 2, 0, 1024 - w))
                y0 = int(np.clip(cy - h / 2, 0, 1024 - h))
                Image.fromarray(slide.read(x0, y0, w, h)).save(folder / name, quality=95)
                inside = [(x - x0, y - y0, t, int(d)) for (x, y), t, d in zip(xy, types, diag, strict=True)
                          if 0 <= x - x0 < w and 0 <= y - y0 < h]
                with open(folder / f"{Path(name).stem}.cells.csv", "w", newline="") as out:
                    writer = csv.writer(out)
                    writer.writerow(["cell_id", "x", "y", "cell_type", "diagnostic"])
                    writer.writerows([[i, f"{x:.1f}", f"{y:.1f}", t, d] for i, (x, y, t, d) in enumerate(inside)])
            slide.close()
            rows.append(f"{row['slide_id']},{row['patient_id']},fields/{row['slide_id']},fields,{MPP}")
    (cohort / "slides.csv").write_text("slide_id,patient_id,source,kind,mpp\n" + "\n".join(rows) + "\n")
    bags, run, out = root / "bags", root / "run", root / "explained"
    assert main(["embed", "--cohort", str(cohort), "--out", str(bags), *EMBED]) == 0
    assert main(["train", "--cohort", str(cohort), "--bags", str(bags), "--out", str(run), "--set", "train.epochs=2",
                 "train.batch_size=4", "model.hidden_dim=16", "-q"]) == 0
    assert main(["explain", "--run", str(run), "--cohort", str(cohort), "--bags", str(bags), "--out", str(out),
                 "--top-k", "4", "-q"]) == 0
    return cohort, bags, out


def test_fields_are_detected_one_by_one_in_their_own_pixels(fields: tuple[Path, Path, Path]) -> None:
    cohort, bags, _ = fields
    slides = load_cohort(cohort, CLASSES, ()).slides
    assert len(slides) >= 4 and all(s.source_kind == "fields" for s in slides)
    matched = total = 0
    for slide in slides:
        bag = read_bag(bags / f"{slide.slide_id}.h5")
        assert bag.field_names == FIELD_FILES and bag.field is not None
        assert sorted(set(bag.field.tolist())) == [0, 1, 2]   # cells found in every field
        for k, (w, h) in enumerate(FIELD_SIZES):
            sel = bag.field == k
            assert ((bag.coords[sel] >= 0) & (bag.coords[sel] < [w, h])).all()
            assert all(str(c).startswith(f"{FIELD_FILES[k]}:") for c in bag.cell_ids[sel])
        assert bag.bboxes is not None and bag.thumbnails is not None and bag.attrs["mpp"] == MPP
        assert bag.attrs["crop_px"] == 96 and json.loads(bag.attrs["fields"]) == list(FIELD_FILES)
        # Each field's truth (in its own pixels) is matched within 5 µm: positions are per field.
        assert bag.cell_types is not None and bag.diagnostic is not None
        matched += sum(t != "unmatched" for t in bag.cell_types)
        total += bag.n_cells
        meta = json.loads((bags / "detections" / f"{slide.slide_id}.json").read_text())
        assert meta["fields"] == list(FIELD_FILES)
        with open(bags / "detections" / f"{slide.slide_id}.csv", newline="") as fh:
            assert [int(r["field"]) for r in csv.DictReader(fh)] == bag.field.tolist()
    assert matched >= 0.9 * total


def test_fields_get_one_heatmap_each(fields: tuple[Path, Path, Path]) -> None:
    cohort, bags, out = fields
    for slide in load_cohort(cohort, CLASSES, ()).slides:
        folder = out / slide.patient_id
        bag = read_bag(bags / f"{slide.slide_id}.h5", thumbnails=False)
        for k in range(3):
            png = folder / f"heatmap_{slide.slide_id}_field{k}.png"
            assert png.stat().st_size > 5000
            with Image.open(png) as image:
                assert image.size[0] > 300
            doc = json.loads((folder / f"{slide.slide_id}_field{k}.geojson").read_text())
            assert len(doc["features"]) == int((bag.field == k).sum())
        with open(folder / "cell_scores.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert {r["field"] for r in rows} == set(FIELD_FILES)
        assert all(r["cell_id"].startswith(r["field"] + ":") for r in rows)
        report = (folder / "report.html").read_text()
        assert report.count("field_") >= 3 and not (folder / "mosaic.png").exists()


def test_fields_resume_without_detecting_again(fields: tuple[Path, Path, Path]) -> None:
    cohort, bags, _ = fields
    stamps = {p: p.stat().st_mtime_ns for p in (bags / "detections").iterdir()}
    assert main(["embed", "--cohort", str(cohort), "--out", str(bags), *EMBED]) == 0
    assert {p: p.stat().st_mtime_ns for p in (bags / "detections").iterdir()} == stamps


def test_external_detections_of_fields(fields: tuple[Path, Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cohort, _, _ = fields
    source = load_cohort(cohort, CLASSES, ()).slides[0].source
    folder = tmp_path / "c" / "F"
    shutil.copytree(source, folder)
    root = _cohort(tmp_path / "c", ["F,P1,F,fields,0.25"], header="slide_id,patient_id,source,kind,mpp")
    want = {}
    for k, name in enumerate(FIELD_FILES):   # each field's cells: its truth file, as a QuPath-like CSV
        stem = Path(name).stem
        with open(folder / f"{stem}.cells.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        (folder / f"{stem}.csv").write_text("x;y;Class\n" + "".join(
            f"{r['x'].replace('.', ',')};{r['y'].replace('.', ',')};QP {r['cell_type']}\n" for r in rows))
        want |= {f"{name}:{round(float(r['x']))}_{round(float(r['y']))}": (k, f"QP {r['cell_type']}") for r in rows}
    bags = tmp_path / "bags"
    assert main(["embed", "--cohort", str(root), "--out", str(bags), "--detector", "external", *EMBED]) == 0
    bag = read_bag(bags / "F.h5", thumbnails=False)
    assert bag.field is not None and bag.cell_types is not None
    got = {str(c): (int(f), str(t)) for c, f, t in zip(bag.cell_ids, bag.field, bag.cell_types, strict=True)}
    assert got == want   # the truth file still matches, but the detector's classes name the types
    (folder / "field_1.csv").unlink()
    line = _one_line_error(["embed", "--cohort", str(root), "--out", str(tmp_path / "b2"), "--detector", "external",
                            *EMBED], capsys)
    assert line.endswith("slide F: no external detections for field_1.jpg: expected field_1.geojson or field_1.csv "
                         f"beside it in {folder} (--detector external)")


KIND_ERRORS = {
    "unknown kind": ("S1,P1,f,field,0.25", "slides.csv row 2: kind 'field' of slide 'S1' is not one of scan, crops, "
                     "fields (did you mean 'fields'?)"),
    "fields without mpp": ("S1,P1,f,fields,", "slides.csv row 2: slide 'S1' is a folder of fields and needs its "
                           "microns per pixel in the mpp column (a photograph does not carry them)"),
    "fields that are a file": ("S1,P1,s.tiff,fields,0.25", "slides.csv row 2: slide 'S1' has kind 'fields' but its "
                               "source is a file; fields are a folder (a single scanned file is kind 'scan')"),
    "a scan that is a folder": ("S1,P1,f,scan,", "slides.csv row 2: slide 'S1' has kind 'scan' but its source is a "
                                "folder; a scan is one file (a folder of photographed fields is kind 'fields', of "
                                "single-cell crops 'crops')"),
}


@pytest.mark.parametrize("case", list(KIND_ERRORS))
def test_kind_errors_are_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row, message = KIND_ERRORS[case]
    root = _cohort(tmp_path / "c", [row], header="slide_id,patient_id,source,kind,mpp")
    (root / "f").mkdir()
    (root / "s.tiff").write_bytes(b"")
    with pytest.raises(ManifestError):
        load_cohort(root, CLASSES, ())
    line = _one_line_error(["embed", "--cohort", str(root), "--out", str(tmp_path / "bags"), *EMBED], capsys)
    assert line == f"milhema: error: {message}"


def test_unreadable_field_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _cohort(tmp_path / "c", ["S1,P1,f,fields,0.25"], header="slide_id,patient_id,source,kind,mpp")
    (root / "f").mkdir()
    Image.fromarray(np.full((300, 300, 3), 240, np.uint8)).save(root / "f" / "a.png")
    (root / "f" / "b.png").write_bytes(b"\x89PNG not really")
    line = _one_line_error(["embed", "--cohort", str(root), "--out", str(tmp_path / "bags"), *EMBED], capsys)
    assert line.startswith("milhema: error: slide S1: field b.png is not a readable image (")


def test_kind_column_may_be_partly_empty(tmp_path: Path) -> None:
    root = _cohort(tmp_path / "c", ["S1,P1,f,,", "S2,P1,s.tiff,,", "S3,P2,g,fields,0.3", "S4,P2,f,crops,"],
                   header="slide_id,patient_id,source,kind,mpp")
    (root / "f").mkdir()
    (root / "g").mkdir()
    (root / "s.tiff").write_bytes(b"")
    kinds = [s.source_kind for s in load_cohort(root, CLASSES, ()).slides]
    assert kinds == ["crops", "scan", "fields", "crops"]
