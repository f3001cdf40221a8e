from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from milhema.data import load_cohort
from milhema.errors import ManifestError

CLASSES = ["AML", "MDS", "VEXAS", "reactive"]
CBC = ["wbc", "hb", "plt"]


def _write(root: Path, patients: str, slides: str, folders: tuple[str, ...] = ("s1", "s2", "s3")) -> Path:
    for name in folders:
        (root / name).mkdir(exist_ok=True)
    (root / "patients.csv").write_text(patients, encoding="utf-8")
    (root / "slides.csv").write_text(slides, encoding="utf-8")
    return root


GOOD_PATIENTS = "patient_id,label,wbc,hb,plt,age,sex\nP1,AML,12.5,8.1,40,70,M\nP2,MDS,,9.9,110,75,F\nP3,,3.2,10.1,,60,M\n"
GOOD_SLIDES = "slide_id,patient_id,source,view,mpp\nS1,P1,s1,PB,0.25\nS2,P1,s2,BM,\nS3,P2,s3,PB,0.25\n"


def test_valid_manifest(tmp_path: Path) -> None:
    cohort = load_cohort(_write(tmp_path, GOOD_PATIENTS, GOOD_SLIDES), CLASSES, CBC)
    assert cohort.patient_ids == ["P1", "P2", "P3"]
    assert [s.slide_id for s in cohort.slides_of("P1")] == ["S1", "S2"]
    assert cohort.slides_of("P3") == []
    assert cohort.labels().tolist() == [0, 1, -1]
    cbc = cohort.patient_matrix()
    assert cbc.shape == (3, 3) and cbc[0].tolist() == [12.5, 8.1, 40.0]
    assert math.isnan(cbc[1, 0]) and math.isnan(cbc[2, 2])
    s2 = cohort.slides[1]
    assert s2.view == "BM" and s2.mpp is None and s2.source == (tmp_path / "s2").resolve()
    assert cohort.patients["P1"].age == 70 and cohort.patients["P1"].sex == "M"


def test_excel_export_with_semicolons_bom_and_decimal_commas(tmp_path: Path) -> None:
    patients = "\ufeffpatient_id;label;wbc;hb;plt\nP1;AML;12,5;8,1;40\n"
    slides = "slide_id;patient_id;source\nS1;P1;s1\n\n"
    cohort = load_cohort(_write(tmp_path, patients, slides), CLASSES, CBC)
    assert cohort.patient_matrix()[0].tolist() == [12.5, 8.1, 40.0]


@pytest.mark.parametrize("patients, slides, message", [
    ("", GOOD_SLIDES, r"patients.csv: file is empty"),
    ("patient_id,label,wbc,hb\nP1,AML,1,2\n", GOOD_SLIDES, r"patients.csv row 1: required column 'plt' is missing"),
    ("patient_id,diagnosis,wbc,hb,plt\nP1,AML,1,2,3\n", GOOD_SLIDES, r"required column 'label' is missing"),
    # spellings of the same column are suggested; other quantities (HbA1c, MCHC for MCH) never are
    ("Patient-ID,label,wbc,hb,plt\nP1,AML,1,2,3\n", GOOD_SLIDES,
     r"required column 'patient_id' is missing \(found 'Patient-ID'; rename it\)$"),
    ("patient_id,label,WBC 10^9/L,hb,plt\nP1,AML,1,2,3\n", GOOD_SLIDES,
     r"required column 'wbc' is missing \(found 'WBC 10\^9/L'; rename it, with its values in the units"),
    ("patient_id,label,wbc,Hb [g/dL],plt\nP1,AML,1,2,3\n", GOOD_SLIDES, r"\(found 'Hb \[g/dL\]'; rename it"),
    ("patient_id,label,wbc,hb_a1c,plt\nP1,AML,1,2,3\n", GOOD_SLIDES,
     r"required column 'hb' is missing; the header has 'patient_id, label, wbc, hb_a1c, plt'$"),
    ("patient_id,label,wbc,hgb,plt\nP1,AML,1,2,3\n", GOOD_SLIDES,
     r"required column 'hb' is missing; the header has 'patient_id, label, wbc, hgb, plt'$"),
    ("patient_id,label,wbc,hb,plt\nP1,AML,1,2,3\nP1,MDS,1,2,3\n", GOOD_SLIDES,
     r"patients.csv row 3: patient_id 'P1' already used in row 2"),
    ("patient_id,label,wbc,hb,plt\nP1,AMl,1,2,3\n", GOOD_SLIDES,
     r"patients.csv row 2: label 'AMl' is not one of AML, MDS, VEXAS, reactive \(did you mean 'AML'\?\)"),
    ("patient_id,label,wbc,hb,plt\nP1,AML,1,low,3\n", GOOD_SLIDES,
     r"patients.csv row 2: hb 'low' is not a number \(leave the cell empty if missing\)"),
    ("patient_id,label,wbc,hb,plt\nP1,AML,1,2,inf\n", GOOD_SLIDES, r"row 2: plt 'inf' is not a finite number"),
    ("patient_id,label,wbc,hb,plt\nP1,AML,-1,2,3\n", GOOD_SLIDES, r"row 2: wbc '-1' is negative"),
    ("patient_id,label,wbc,hb,plt\nP1,AML,1,2\n", GOOD_SLIDES, r"row 2: 4 values for 5 columns"),
    ("patient_id,label,wbc,hb,plt\n../etc,AML,1,2,3\n", GOOD_SLIDES, r"patient_id '../etc' is not safe"),
    ("patient_id,label,wbc,hb,plt\n,AML,1,2,3\n", GOOD_SLIDES, r"row 2: patient_id is empty"),
    ("patient_id,label,wbc,hb,plt\n", GOOD_SLIDES, r"patients.csv: no patient rows"),
    ("patient_id,label,wbc,hb,plt,time,event\nP1,AML,1,2,3,0,1\n", GOOD_SLIDES, r"time '0' must be greater than 0"),
    ("patient_id,label,wbc,hb,plt,time,event\nP1,AML,1,2,3,5,2\n", GOOD_SLIDES, r"event '2' must be 0"),
    ("patient_id,label,wbc,wbc,plt\nP1,AML,1,2,3\n", GOOD_SLIDES, r"row 1: column 'wbc' appears twice"),
])
def test_patient_errors(tmp_path: Path, patients: str, slides: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        load_cohort(_write(tmp_path, patients, slides), CLASSES, CBC)


P = "patient_id,label,wbc,hb,plt\nP1,AML,1,2,3\nP2,MDS,1,2,3\n"


@pytest.mark.parametrize("slides, message", [
    ("slide_id,patient_id\nS1,P1\n", r"slides.csv row 1: required column 'source' is missing"),
    ("slide_id,patient_id,source\nS1,P9,s1\n", r"slides.csv row 2: patient_id 'P9' of slide 'S1' is not in patients.csv"),
    ("slide_id,patient_id,source\nS1,p1,s1\n", r"did you mean 'P1'"),
    ("slide_id,patient_id,source\nS1,P1,s1\nS1,P2,s2\n", r"slides.csv row 3: slide_id 'S1' already used in row 2"),
    ("slide_id,patient_id,source\nS1,P1,nowhere\n", r"slides.csv row 2: source 'nowhere' of slide 'S1' does not exist"),
    ("slide_id,patient_id,source\n../../x,P1,s1\n", r"slide_id '../../x' is not safe as a file name"),
    ("slide_id,patient_id,source\na/b,P1,s1\n", r"slide_id 'a/b' is not safe"),
    ("slide_id,patient_id,source\nS1,P1,\n", r"source of slide 'S1' is empty"),
    ("slide_id,patient_id,source,mpp\nS1,P1,s1,abc\n", r"mpp 'abc' is not a number"),
    ("slide_id,patient_id,source,mpp\nS1,P1,s1,0\n", r"mpp '0' is not a plausible"),
])
def test_slide_errors(tmp_path: Path, slides: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        load_cohort(_write(tmp_path, P, slides), CLASSES, CBC)


def test_missing_files_and_labels(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cohort folder .* does not exist"):
        load_cohort(tmp_path / "nope", CLASSES, CBC)
    (tmp_path / "patients.csv").write_text(P)
    with pytest.raises(ManifestError, match="slides.csv: file not found"):
        load_cohort(tmp_path, CLASSES, CBC)
    _write(tmp_path, GOOD_PATIENTS, GOOD_SLIDES)
    with pytest.raises(ManifestError, match="row 4: patient 'P3' has no label"):
        load_cohort(tmp_path, CLASSES, CBC, require_labels=True)
    assert load_cohort(tmp_path, CLASSES, CBC, check_sources=False).labels().tolist() == [0, 1, -1]


def test_non_utf8_is_reported(tmp_path: Path) -> None:
    _write(tmp_path, P, GOOD_SLIDES)
    (tmp_path / "patients.csv").write_bytes("patient_id,label,wbc,hb,plt\nPé,AML,1,2,3\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_cohort(tmp_path, CLASSES, CBC)


def test_patient_matrix_subset_order(tmp_path: Path) -> None:
    cohort = load_cohort(_write(tmp_path, GOOD_PATIENTS, GOOD_SLIDES), CLASSES, CBC)
    assert np.array_equal(cohort.labels(["P2", "P1"]), [1, 0])
    assert cohort.patient_matrix(["P2"]).shape == (1, 3)
