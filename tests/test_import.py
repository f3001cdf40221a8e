"""``milhema import``: the public layouts as the tests build them (exactly the shapes the README
documents), messy the way real downloads are, then imported, checked, and run end to end."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from milhema.cli import main

LABELS = ("NPM1", "control", "PML_RARA")


def _image(path: Path, rng: np.random.Generator, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def aml_hehr_tree(root: Path, n_patients: int = 12, cells: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """``<root>/data/<label>/<patient_id>/*.tif`` with a metadata CSV, as the TCIA release is laid out,
    plus what real downloads hold: ``.TIF`` in capitals, a patient folder with a space, a
    ``Thumbs.db``, one damaged image, one excluded patient and one patient without a metadata row."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    meta = ["pseudonym,bag_label,instance_count,pb_myeloblast,pb_promyelocyte,pb_myelocyte,examine_exclude,"
            "examine_category_quality"]
    for i in range(n_patients):
        label = LABELS[i % 3]
        pid = "pat 03" if i == 3 else f"P{i:02d}"
        for j in range(cells):
            _image(data / label / pid / (f"image_{j}.tif" if j % 2 else f"{j}.TIF"), rng)
        if i == 0:
            (data / label / pid / "Thumbs.db").write_bytes(b"\x00\x01")
            (data / label / pid / "image_99.tif").write_bytes(b"not a tiff")
        if i != 5:  # patient 5 has no metadata row
            blasts = 60 + rng.integers(0, 30) if label != "control" else rng.integers(0, 2)
            meta.append(f"{pid},{label},{cells},{blasts},{rng.integers(0, 5)},{rng.integers(0, 5)},"
                        f"{'TRUE' if i == 7 else ''},{'good' if i % 2 else 'fair'}")
    (root / "metadata.csv").write_text("\n".join(meta) + "\n")
    return data, root / "metadata.csv"


def test_aml_hehr_import_reads_the_tree_as_it_comes(tmp_path: Path, capsys) -> None:
    data, metadata = aml_hehr_tree(tmp_path / "download")
    out = tmp_path / "cohort"
    assert main(["import", "aml-hehr", str(data), "--out", str(out), "--metadata", str(metadata), "--mpp", "0.1",
                 "-q"]) == 0
    said = capsys.readouterr().out
    assert "aml-hehr: 11 patients, 11 slides; NPM1 4, PML_RARA 4, control 3" in said
    assert "cells per patient: min 6, median 6, max 6 (66 in all)" in said
    assert ("left out: 1 file(s) that are not images; 1 patient(s) excluded by examine_exclude; "
            "1 unreadable image(s) (embed skips them too)") in said
    assert "1 patient(s) without a metadata row (their values are empty)" in said
    patients = _rows(out / "patients.csv")
    assert list(patients[0]) == ["patient_id", "label", "instance_count", "pb_myeloblast", "pb_promyelocyte",
                                 "pb_myelocyte"]   # numeric metadata only; flags and labels are not features
    by_id = {p["patient_id"]: p for p in patients}
    assert "P07" not in by_id and by_id["pat_03"]["label"] == "NPM1" and by_id["P05"]["pb_myeloblast"] == ""
    slides = _rows(out / "slides.csv")
    assert {s["mpp"] for s in slides} == {"0.1"}
    first = next(s for s in slides if s["slide_id"] == "pat_03")
    assert first["source"] == "../download/data/NPM1/pat 03"        # in place, relative to the cohort
    assert (out / first["source"]).resolve() == (data / "NPM1" / "pat 03").resolve()
    record = json.loads((out / "import.json").read_text())
    assert record["renamed"] == {"pat 03": "pat_03"} and record["cells"] == 66
    config = (out / "config.yaml").read_text()
    assert "- NPM1" in config and "- pb_myeloblast" in config
    # The same arguments give byte-identical files; the source is untouched.
    before = _digest(out)
    assert main(["import", "aml-hehr", str(data), "--out", str(out), "--metadata", str(metadata), "--mpp", "0.1",
                 "--overwrite", "-q"]) == 0
    assert _digest(out) == before


def test_aml_hehr_classes_keep_rename_and_merge(tmp_path: Path, capsys) -> None:
    data, _ = aml_hehr_tree(tmp_path / "download", n_patients=6)
    out = tmp_path / "cohort"
    assert main(["import", "aml-hehr", str(data), "--out", str(out), "--classes", "NPM1=AML", "PML_RARA=AML",
                 "-q"]) == 0
    assert {p["label"] for p in _rows(out / "patients.csv")} == {"AML"}
    assert "2 patient(s) with a label --classes does not list (control)" in capsys.readouterr().out
    assert main(["import", "aml-hehr", str(data), "--out", str(tmp_path / "c2"), "--classes", "NMP1=AML"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("milhema: error: --classes names 'NMP1', which is not a label of this source "
                   "(NPM1, PML_RARA, control) (did you mean 'NPM1'?)")


def test_dry_run_writes_nothing(tmp_path: Path, capsys) -> None:
    data, metadata = aml_hehr_tree(tmp_path / "download", n_patients=3)
    assert main(["import", "aml-hehr", str(data), "--out", str(tmp_path / "cohort"), "--dry-run", "-q"]) == 0
    assert "aml-hehr: 3 patients" in capsys.readouterr().out
    assert not (tmp_path / "cohort").exists()


@pytest.mark.parametrize(("shape", "message"), [
    ("one level too deep", "NPM1/ holds images directly: is {src} the folder of one label (pass its parent)"),
    ("images in the root", "expected the AML_Hehr tree <root>/<label>/<patient_id>/*.tif; found 2 images directly"),
    ("empty", "expected the AML_Hehr tree <root>/<label>/<patient_id>/*.tif; found no folders"),
    ("one level too shallow", "but NPM1/P00/ holds folders: pass the folder whose subfolders are the labels"),
    ("patient under two labels", "patient 'P00' appears under two label folders"),
    ("no images at all", "no patient with images left to import (1 file(s) that are not images; 2 patient(s) "
                         "without any readable image)"),
])
def test_wrong_layouts_are_refused_in_one_line(shape: str, message: str, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    if shape == "one level too deep":
        _image(src / "NPM1" / "a.tif", rng)
    elif shape == "images in the root":
        _image(src / "a.tif", rng)
        _image(src / "b.tif", rng)
    elif shape == "empty":
        src.mkdir()
    elif shape == "one level too shallow":
        _image(src / "NPM1" / "P00" / "x" / "a.tif", rng)
    elif shape == "patient under two labels":
        _image(src / "NPM1" / "P00" / "a.tif", rng)
        _image(src / "control" / "P00" / "a.tif", rng)
    else:
        (src / "NPM1" / "P00").mkdir(parents=True)
        (src / "NPM1" / "P01").mkdir(parents=True)
        (src / "NPM1" / "P01" / "notes.txt").write_text("x")
    assert main(["import", "aml-hehr", str(src), "--out", str(tmp_path / "cohort")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(src=src) in err[0], err
    assert not (tmp_path / "cohort").exists() and not list(tmp_path.glob(".cohort*"))


def test_the_source_is_never_written_to(tmp_path: Path, capsys) -> None:
    data, _ = aml_hehr_tree(tmp_path / "download", n_patients=3)
    assert main(["import", "aml-hehr", str(data), "--out", str(data / "cohort")]) == 2
    assert "is inside the source" in capsys.readouterr().err


def cellavision_tree(root: Path, n_patients: int = 12, seed: int = 0, slides: bool = False) -> tuple[Path, Path]:
    """``<root>/<patient>/[<slide>/]<cell type>/*.jpg`` and a labels CSV with the CBC."""
    rng = np.random.default_rng(seed)
    types = ("Blast", "Neutrophil segmented", "Lymphocyte")
    rows = ["patient_id,label,wbc,hb"]
    for i in range(n_patients):
        pid = f"PAT-{i:02d}"
        label = "AML" if i % 2 else "reactive"
        for s in (("smear1", "smear2") if slides and i % 3 == 0 else ("",)):
            for t, cell_type in enumerate(types):
                n = (3 if cell_type == "Blast" else 1) if label == "AML" else (0 if cell_type == "Blast" else 2)
                for j in range(n):
                    _image(root / pid / s / cell_type / f"{t}{j}.JPG", rng)
        if i != 4:
            rows.append(f"{pid},{label},{rng.lognormal(2, 0.5):.1f},{rng.normal(12, 2):.1f}")
    (root.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, root.parent / "labels.csv"


def test_cellavision_export_with_and_without_a_slide_level(tmp_path: Path, capsys) -> None:
    src, labels = cellavision_tree(tmp_path / "export", slides=True)
    out = tmp_path / "cohort"
    assert main(["import", "cellavision", str(src), "--out", str(out), "--labels", str(labels), "-q"]) == 0
    said = capsys.readouterr().out
    assert "cellavision: 12 patients, 16 slides" in said
    assert "1 patient(s) without a row in --labels (no label)" in said
    patients = {p["patient_id"]: p for p in _rows(out / "patients.csv")}
    assert list(next(iter(patients.values()))) == ["patient_id", "label", "wbc", "hb"]
    assert patients["PAT-04"]["label"] == "" and patients["PAT-01"]["label"] == "AML"
    slides = _rows(out / "slides.csv")
    assert {s["slide_id"] for s in slides if s["patient_id"] == "PAT-00"} == {"PAT-00_smear1", "PAT-00_smear2"}
    assert next(s for s in slides if s["patient_id"] == "PAT-01")["source"] == "../export/PAT-01"
    bad = tmp_path / "bad"
    _image(bad / "PAT-00" / "a.jpg", np.random.default_rng(0))
    assert main(["import", "cellavision", str(bad), "--out", str(tmp_path / "c2")]) == 2
    assert "PAT-00/ holds images directly, not in cell-type folders" in capsys.readouterr().err


def _features_only(path: Path, n: int, dim: int, rng: np.random.Generator, shift: float = 0.0) -> None:
    """A per-patient embedding as DinoBloom publishes them: one dataset, features [N, D]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[: max(1, n // 5), 0] += shift
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=x)


def embeddings_tree(root: Path, n_patients: int = 12, dim: int = 8, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    rows = ["patient_id,label,pb_myeloblast"]
    for i in range(n_patients):
        label = "AML" if i % 2 else "control"
        _features_only(root / label / f"pt{i:02d}.h5", int(rng.integers(20, 40)), dim, rng,
                       shift=4.0 if label == "AML" else 0.0)
        rows.append(f"pt{i:02d},{label},{rng.integers(20, 90) if label == 'AML' else 0}")
    (root / "model.pt").write_bytes(b"\x80\x04not loaded")
    (root.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, root.parent / "labels.csv"


def test_embeddings_are_used_as_bags_without_embedding(tmp_path: Path, capsys) -> None:
    src, labels = embeddings_tree(tmp_path / "published")
    out = tmp_path / "cohort"
    assert main(["import", "embeddings", str(src), "--out", str(out), "--labels", str(labels), "-q"]) == 0
    said = capsys.readouterr().out
    assert "embeddings: 12 patients, 12 slides" in said and "feature rows per patient" in said
    assert "1 PyTorch .pt/.pth file(s) (pickles are never loaded)" in said
    assert "next: milhema cv --config" in said
    slides = _rows(out / "slides.csv")
    assert slides[0]["source"].endswith(".h5")
    # The cohort trains with no --bags: each slide's source is its bag.
    run = tmp_path / "run"
    assert main(["cv", "--config", str(out / "config.yaml"), "--cohort", str(out), "--out", str(run), "-q",
                 "--folds", "3", "--set", "train.epochs=25", "tracking.mode=disabled"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["AML", "control"] and metrics["patient"]["macro_auroc"]["mean"] > 0.8
    cells = _rows(run / "cell_scores" / "pt01.csv")
    assert [c["cell_id"] for c in cells[:3]] == ["0", "1", "2"]   # features without positions: rows
    assert main(["explain", "--run", str(run), "--cohort", str(out), "--out", str(tmp_path / "why"),
                 "--patient", "pt01", "-q"]) == 0
    assert (tmp_path / "why" / "pt01" / "report.html").is_file()
    # Embedding such a cohort again is refused, not silently done.
    assert main(["embed", "--config", str(out / "config.yaml"), "--cohort", str(out), "--out",
                 str(tmp_path / "bags"), "--backbone", "none", "--morphology"]) == 2
    assert "already embedded" in capsys.readouterr().err


def test_embeddings_of_two_sizes_are_refused(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    _features_only(tmp_path / "src" / "a.h5", 5, 8, rng)
    _features_only(tmp_path / "src" / "b.h5", 5, 16, rng)
    assert main(["import", "embeddings", str(tmp_path / "src"), "--out", str(tmp_path / "c")]) == 2
    assert "b.h5 has 16 features per cell but a.h5 has 8: one cohort needs one embedding" in capsys.readouterr().err


def test_aml_hehr_end_to_end(tmp_path: Path, capsys) -> None:
    """import -> embed (morphology features, which need the imported µm per pixel) -> cv -> explain."""
    data, metadata = aml_hehr_tree(tmp_path / "download", n_patients=12, cells=8)
    cohort, bags = tmp_path / "cohort", tmp_path / "bags"
    assert main(["import", "aml-hehr", str(data), "--out", str(cohort), "--metadata", str(metadata), "--mpp", "0.5",
                 "--classes", "NPM1=AML", "PML_RARA=AML", "control", "-q"]) == 0
    config = str(cohort / "config.yaml")
    assert main(["embed", "--config", config, "--cohort", str(cohort), "--out", str(bags), "--backbone", "none",
                 "--morphology", "-q"]) == 0
    assert main(["cv", "--config", config, "--cohort", str(cohort), "--bags", str(bags), "--out",
                 str(tmp_path / "run"), "--folds", "3", "-q", "--set", "train.epochs=5", "tracking.mode=disabled"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["classes"] == ["AML", "control"] and metrics["n_patients"] == 11
    assert "cbc_only" in metrics["baselines"]   # the imported blast percentages are patient features
    assert main(["explain", "--run", str(tmp_path / "run"), "--cohort", str(cohort), "--bags", str(bags),
                 "--out", str(tmp_path / "why"), "--patient", "P00", "-q"]) == 0
    report = (tmp_path / "why" / "P00" / "report.html").read_text()
    assert "pb_myeloblast" in report


def test_cellavision_end_to_end_names_the_cell_types(tmp_path: Path) -> None:
    """import -> embed (cell-type folders walked) -> cv -> explain, whose report names the analyser's types."""
    src, labels = cellavision_tree(tmp_path / "export", n_patients=12, slides=True)
    cohort, bags = tmp_path / "cohort", tmp_path / "bags"
    assert main(["import", "cellavision", str(src), "--out", str(cohort), "--labels", str(labels), "--mpp", "0.5",
                 "-q"]) == 0
    config = str(cohort / "config.yaml")
    assert main(["embed", "--config", config, "--cohort", str(cohort), "--out", str(bags), "--backbone", "none",
                 "--morphology", "-q"]) == 0
    assert main(["cv", "--config", config, "--cohort", str(cohort), "--bags", str(bags), "--out",
                 str(tmp_path / "run"), "--folds", "3", "-q", "--set", "train.epochs=5", "tracking.mode=disabled"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["classes"] == ["AML", "reactive"] and metrics["n_patients"] == 11   # PAT-04 has no label
    assert main(["explain", "--run", str(tmp_path / "run"), "--cohort", str(cohort), "--bags", str(bags),
                 "--out", str(tmp_path / "why"), "--patient", "PAT-01", "-q"]) == 0
    report = (tmp_path / "why" / "PAT-01" / "report.html").read_text()
    assert "Blast" in report and "Neutrophil segmented" in report
    cells = _rows(tmp_path / "why" / "PAT-01" / "cell_scores.csv")
    assert {c["cell_type"] for c in cells} == {"Blast", "Neutrophil segmented", "Lymphocyte"}
