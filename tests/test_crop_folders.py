"""Real-cohort crop folders through the command line (issue 15, part 3): one subfolder per cell
type, cells.csv covering only some images, cohorts without a single cell.

Every cohort is built here from real image files (PNG, JPEG, TIFF rendered by the simulator) and
embedded, trained on and explained with ``milhema`` itself.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milhema.bags import read_bag
from milhema.cli import main
from milhema.synth.crop import render_crop
from milhema.synth.stain import Stain

EMBED = ["--backbone", "none", "--morphology", "--workers", "0", "-q"]
SETTINGS = ["--set", "data.classes=[reactive, AML]", "--set", "data.cbc_columns=[wbc]",
            "--set", "data.cbc_log_columns=[wbc]", "--set", "train.epochs=1", "--set", "train.batch_size=4",
            "--set", "model.hidden_dim=8", "-q"]
MPP = 24.0 / 64

# A CellaVision-style export, written in an order unlike the sorted one: ids must not depend on it.
EXPORT = {
    "Neutrophil segmented/002.JPG": "neutrophil",
    "Blast/001.jpg": "blast",
    "Blast/010.TIF": "blast",
    "003.png": "lymphocyte",
    "Lymphocyte/a b.jpeg": "lymphocyte",
}
EXPECTED_IDS = ["003.png", "Blast/001.jpg", "Blast/010.TIF", "Lymphocyte/a b.jpeg", "Neutrophil segmented/002.JPG"]
EXPECTED_TYPES = ["", "Blast", "Blast", "Lymphocyte", "Neutrophil segmented"]


def _crop(path: Path, cell_type: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rgb, _ = render_crop(cell_type, rng, Stain.random(rng), size=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format={".png": "PNG", ".tif": "TIFF"}.get(path.suffix.lower(), "JPEG"))


def _cohort(root: Path, folders: dict[str, dict[str, str]]) -> Path:
    """patients.csv + slides.csv, one patient per slide (alternating labels), crops as given."""
    cohort = root / "cohort"
    patients, slides = ["patient_id,label,wbc"], ["slide_id,patient_id,source,mpp"]
    for i, (slide_id, crops) in enumerate(folders.items()):
        (cohort / "slides" / slide_id).mkdir(parents=True)
        for j, (name, cell_type) in enumerate(crops.items()):
            _crop(cohort / "slides" / slide_id / name, cell_type, seed=100 * i + j)
        patients.append(f"P{i},{'AML' if i % 2 else 'reactive'},{5 + i}")
        slides.append(f"{slide_id},P{i},slides/{slide_id},{MPP}")
    (cohort / "patients.csv").write_text("\n".join(patients) + "\n")
    (cohort / "slides.csv").write_text("\n".join(slides) + "\n")
    return cohort


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("milhema: error: "), err
    return err


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six slides exported with cell-type subfolders, plus hidden files and a folder nested too deep."""
    root = tmp_path_factory.mktemp("export")
    cohort = _cohort(root, {f"S{i}": EXPORT for i in range(6)})
    first = cohort / "slides" / "S0"
    (first / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _crop(first / ".thumbnails" / "001.jpg", "blast", 7)          # hidden folder: not cells
    _crop(first / "Blast" / ".hidden.jpg", "blast", 8)
    _crop(first / "Blast" / "old" / "001.jpg", "blast", 9)         # deeper than one cell-type folder
    return cohort


def test_cell_type_subfolders_are_cells_with_their_folder_as_type(
        export: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    bags = tmp_path / "bags"
    assert main(["embed", "--cohort", str(export), "--out", str(bags), *EMBED]) == 0
    summary = capsys.readouterr().out
    assert "embedded 30 cells of 6 slides" in summary and "1 file more than one folder deep skipped" in summary
    assert "without cells" not in summary
    for i in range(6):
        bag = read_bag(bags / f"S{i}.h5")
        assert list(bag.cell_ids) == EXPECTED_IDS
        assert bag.cell_types is not None and list(bag.cell_types) == EXPECTED_TYPES
        assert bag.diagnostic is None and bag.thumbnails is not None and bag.thumbnails.mean() > 50
    warned = _warnings(caplog)
    assert any("slide S0: 1 file(s) in crop folder" in w and "are more than one folder deep (Blast/old/001.jpg)" in w
               and w.endswith("; skipped") for w in warned), warned
    assert not any("not images" in w for w in warned), warned
    # The same ids and features again from a fresh listing: nothing depends on the order files were written in.
    again = tmp_path / "again"
    assert main(["embed", "--cohort", str(export), "--out", str(again), *EMBED]) == 0
    first, second = read_bag(bags / "S3.h5"), read_bag(again / "S3.h5")
    assert list(first.cell_ids) == list(second.cell_ids)
    np.testing.assert_array_equal(first.features, second.features)


def test_strict_embedding_refuses_files_nested_too_deep(export: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, ["embed", "--cohort", str(export), "--out", str(tmp_path / "bags"), *EMBED,
                            "--fail-on-bad-image"])
    assert "slide S0: 1 file(s) in crop folder" in err and "(Blast/old/001.jpg)" in err and "move them up" in err
    assert not list((tmp_path / "bags").glob("*.h5"))


def test_training_and_explain_on_cell_type_folders(export: Path, tmp_path: Path) -> None:
    bags, run, out = tmp_path / "bags", tmp_path / "run", tmp_path / "explained"
    assert main(["embed", "--cohort", str(export), "--out", str(bags), *EMBED]) == 0
    assert main(["train", "--cohort", str(export), "--bags", str(bags), "--out", str(run), *SETTINGS]) == 0
    before = set(tmp_path.rglob("*"))
    assert main(["explain", "--run", str(run), "--cohort", str(export), "--bags", str(bags), "--out", str(out),
                 "--patient", "P1", "-q"]) == 0
    with (out / "P1" / "cell_scores.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["cell_id"], r["cell_type"]) for r in rows] == list(zip(EXPECTED_IDS, EXPECTED_TYPES, strict=True))
    assert (out / "P1" / "gallery.png").stat().st_size > 1000 and (out / "P1" / "mosaic.png").exists()
    assert "<img" in (out / "P1" / "report.html").read_text()
    # Cell ids with '/' are text in tables, never paths: no cell-type folder appears in the output.
    created = set(tmp_path.rglob("*")) - before
    assert created and all(p.is_relative_to(out) for p in created)
    assert not [p for p in created if p.is_dir() and p.name in ("Blast", "Lymphocyte", "Neutrophil segmented")]


def test_a_cohort_without_any_image_is_refused_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort = _cohort(tmp_path, {"S1": {}, "S2": {}, "S3": {}})
    (cohort / "slides" / "S1" / "scan notes.txt").write_text("CellaVision export, 2019")
    _crop(cohort / "slides" / "S2" / "Blast" / "2019" / "001.jpg", "blast", 1)
    bags = tmp_path / "bags"
    err = _refused(capsys, ["embed", "--cohort", str(cohort), "--out", str(bags), *EMBED])
    assert err == ("milhema: error: no cell in any of the 3 slides: the 3 crop folders hold no images "
                   "(.bmp, .jpeg, .jpg, .png, .tif, .tiff) and only 1 other file (e.g. 'scan notes.txt') and "
                   "1 file more than one folder deep (e.g. 'Blast/2019/001.jpg'); put each slide's images in its "
                   "folder or in one subfolder per cell type; check the sources in slides.csv")
    assert not [p for p in bags.rglob("*") if p.is_file()]


def test_a_cohort_of_unreadable_images_is_refused_and_keeps_no_bag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort = _cohort(tmp_path, {"S1": {}, "S2": {}})
    for slide in ("S1", "S2"):
        (cohort / "slides" / slide / "Blast").mkdir()
        (cohort / "slides" / slide / "Blast" / "001.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    bags = tmp_path / "bags"
    err = _refused(capsys, ["embed", "--cohort", str(cohort), "--out", str(bags), *EMBED])
    assert err.startswith("milhema: error: no cell in any of the 2 slides: all 2 images are unreadable "
                          "(first: slide S1: Blast/001.jpg: not a readable image")
    assert not [p for p in bags.rglob("*") if p.is_file()]


def test_training_refuses_bags_without_any_cell_and_embed_redoes_empty_bags(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort = _cohort(tmp_path, {f"S{i}": {} for i in range(4)})
    bags = tmp_path / "bags"
    # Shards see only their own slides, so they write empty bags (training is where it is caught).
    for shard in ("0/2", "1/2"):
        assert main(["embed", "--cohort", str(cohort), "--out", str(bags), *EMBED, "--shard", shard]) == 0
    assert [read_bag(bags / f"S{i}.h5").n_cells for i in range(4)] == [0, 0, 0, 0]
    for command in ("train", "cv"):
        err = _refused(capsys, [command, "--cohort", str(cohort), "--bags", str(bags), "--out",
                                str(tmp_path / command), *SETTINGS])
        assert err == (f"milhema: error: no cell in the bags of any of the 4 patients in {bags}: fix the crop "
                       "folders or scans of slides.csv and run milhema embed again")
        assert not (tmp_path / command).exists()
    # Once the folders are fixed, embedding again fills the empty bags without --overwrite.
    for i in range(4):
        _crop(cohort / "slides" / f"S{i}" / "Blast" / "001.jpg", "blast", i)
    assert main(["embed", "--cohort", str(cohort), "--out", str(bags), *EMBED]) == 0
    assert [read_bag(bags / f"S{i}.h5").n_cells for i in range(4)] == [1, 1, 1, 1]


def test_cells_csv_missing_rows_keeps_the_other_annotations(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    crops = {"a.png": "blast", "b.png": "neutrophil", "c.png": "neutrophil", "Blast/d.jpg": "blast"}
    cohort = _cohort(tmp_path, {"S1": crops, "S2": crops, "S3": crops})
    # S1: no row for b.png and Blast/d.jpg, and a row for an image that is not there.
    (cohort / "slides" / "S1" / "cells.csv").write_text(
        "cell_id,cell_type,diagnostic\na.png,blast,1\nc.png,neutrophil,0\ngone.png,blast,1\n")
    # S2: a row for every image (its own type wins over the folder's name).
    (cohort / "slides" / "S2" / "cells.csv").write_text(
        "cell_id,cell_type,diagnostic\na.png,blast,1\nb.png,neutrophil,0\nc.png,,0\nBlast/d.jpg,myeloblast,1\n")
    # S3: types only, no diagnostic column: which cells carry the diagnosis is unknown, not "none".
    (cohort / "slides" / "S3" / "cells.csv").write_text("cell_id,cell_type\na.png,blast\n")
    bags = tmp_path / "bags"
    assert main(["embed", "--cohort", str(cohort), "--out", str(bags), *EMBED]) == 0
    summary = capsys.readouterr().out
    assert "; 5 images without a cells.csv row (2 slides: S1, S3); 1 cells.csv row naming no image (slide S1)" \
        in summary, summary
    s1, s2, s3 = (read_bag(bags / f"S{i}.h5") for i in (1, 2, 3))
    assert list(s1.cell_ids) == ["Blast/d.jpg", "a.png", "b.png", "c.png"]
    assert s1.cell_types is not None and list(s1.cell_types) == ["Blast", "blast", "", "neutrophil"]
    assert s1.diagnostic is None
    assert s2.cell_types is not None and list(s2.cell_types) == ["myeloblast", "blast", "neutrophil", ""]
    assert s2.diagnostic is not None and s2.diagnostic.tolist() == [True, True, False, False]
    assert s3.cell_types is not None and list(s3.cell_types) == ["Blast", "blast", "", ""] and s3.diagnostic is None
    warned = _warnings(caplog)
    assert ("slide S1: cells.csv has no row for 2 of 4 images (Blast/d.jpg, b.png); they are embedded with "
            "their folder's name as cell type, or none at the top level; the slide's diagnostic flags are dropped"
            ) in warned, warned
    assert ("slide S3: cells.csv has no row for 3 of 4 images (Blast/d.jpg, b.png, c.png); they are embedded "
            "with their folder's name as cell type, or none at the top level") in warned, warned
    assert any(w.startswith("slide S1: 1 row(s) of cells.csv name no image in crop folder")
               and w.endswith("(gone.png); ignored") for w in warned), warned


def test_a_class_folder_dataset_trains_the_cell_classifier_through_the_merge_map(
        export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """<root>/<type>/*.jpg is a crop folder with type subfolders: its folder names are the annotations,
    read as cells.types through cells.merge; without the map they are counted as unknown, never guessed."""
    import json

    bags = tmp_path / "bags"
    assert main(["embed", "--cohort", str(export), "--out", str(bags), *EMBED]) == 0
    err = _refused(capsys, ["cells", "train", "--cohort", str(export), "--bags", str(bags), "--out",
                            str(tmp_path / "none"), "--folds", "2", "-q"])
    assert "no annotated cell of a type in cells.types" in err
    assert "(the annotated names found: 'Blast', 'Lymphocyte', 'Neutrophil segmented')" in err
    assert main(["cells", "train", "--cohort", str(export), "--bags", str(bags), "--out", str(tmp_path / "some"),
                 "--folds", "2", "--set", "cells.merge={Blast: blast, Lymphocyte: lymphocyte}", "cells.epochs=2",
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "merged: Blast -> blast (12), Lymphocyte -> lymphocyte (6)" in out
    assert "left out, not one of cells.types or cells.merge: 'Neutrophil segmented' (6 cells" in out
    merge = "cells.merge={Blast: blast, Lymphocyte: lymphocyte, Neutrophil segmented: neutrophil}"
    assert main(["cells", "train", "--cohort", str(export), "--bags", str(bags), "--out", str(tmp_path / "run"),
                 "--folds", "2", "--set", merge, "cells.epochs=2", "-q"]) == 0
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())["annotations"]
    assert report["unknown"] == {} and report["not_annotated"] == 6   # the top-level 003.png of each slide
    assert report["merged"]["Blast"] == {"type": "blast", "cells": 12}
    assert report["per_type"]["neutrophil"] == 6 and report["per_type"]["lymphocyte"] == 6
