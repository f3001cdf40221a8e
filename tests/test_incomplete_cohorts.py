"""Real cohorts are not complete: patients with a CBC and no slide, cohorts without any CBC, new
cohorts that lack a CBC column, configs written with the old key names. Each through the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_train import planted_cohort

from milhema.cli import main
from milhema.data.manifest import MissingFeatureWarning

SET = ["--set", "data.classes=[healthy, disease]", "train.epochs=6", "train.batch_size=8", "cv.folds=3",
       "tracking.mode=disabled"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture()
def cohort_with_cbc_only_patients(tmp_path: Path) -> tuple[Path, Path]:
    """The planted cohort plus two labelled patients who have a CBC and no slide."""
    cohort, bags = planted_cohort(tmp_path, n_patients=18)
    patients = _rows(cohort / "patients.csv")
    patients += [{"patient_id": "CBC1", "label": "healthy", "wbc": "6.1", "hb": "13.9"},
                 {"patient_id": "CBC2", "label": "disease", "wbc": "", "hb": "9.5"}]
    _write_rows(cohort / "patients.csv", patients)
    return cohort, bags


def test_a_patient_without_slides_is_predicted_from_the_cbc(cohort_with_cbc_only_patients, tmp_path, capsys) -> None:
    cohort, bags = cohort_with_cbc_only_patients
    args = ["--cohort", str(cohort), "--bags", str(bags)]
    assert main(["cv", *args, "--out", str(tmp_path / "cv"), "-q", *SET,
                 "data.patient_features=[wbc, hb]", "data.log_features=[wbc]"]) == 0
    predicted = {row["patient_id"]: row for row in _rows(tmp_path / "cv" / "predictions.csv")}
    assert {"CBC1", "CBC2"} <= set(predicted)
    for pid in ("CBC1", "CBC2"):
        assert abs(float(predicted[pid]["prob_healthy"]) + float(predicted[pid]["prob_disease"]) - 1) < 1e-5
    assert main(["predict", "--run", str(tmp_path / "cv"), *args, "--out", str(tmp_path / "pred"), "-q"]) == 0
    rows = {row["patient_id"]: row for row in _rows(tmp_path / "pred" / "predictions.csv")}  # out of fold: 1 model
    assert rows["CBC1"]["n_models"] == "1" and rows["CBC1"]["pred"] in ("healthy", "disease")
    # The same patient with another CBC gets another prediction: it is read, not ignored.
    patients = _rows(cohort / "patients.csv")
    for row in patients:
        if row["patient_id"] == "CBC1":
            row["wbc"], row["hb"] = "60", "6.0"
    _write_rows(cohort / "patients.csv", patients)
    assert main(["predict", "--run", str(tmp_path / "cv"), *args, "--out", str(tmp_path / "pred2"), "-q"]) == 0
    changed = {row["patient_id"]: row for row in _rows(tmp_path / "pred2" / "predictions.csv")}["CBC1"]
    assert changed["prob_disease"] != rows["CBC1"]["prob_disease"]


def test_a_patient_without_slides_is_refused_when_the_model_reads_no_patient_feature(
        cohort_with_cbc_only_patients, tmp_path, capsys) -> None:
    cohort, bags = cohort_with_cbc_only_patients
    code = main(["cv", "--cohort", str(cohort), "--bags", str(bags), "--out", str(tmp_path / "cv"), "-q", *SET,
                 "data.patient_features=[wbc, hb]", "fusion.mode=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("milhema: error: patients CBC1 and 1 more have no cell, and the model reads no "
                             "patient feature")
    assert not (tmp_path / "cv").exists()


def test_a_cohort_without_any_cbc_trains_on_cells_alone(tmp_path: Path, capsys) -> None:
    cohort, bags = planted_cohort(tmp_path, n_patients=18)
    patients = [{"patient_id": r["patient_id"], "label": r["label"]} for r in _rows(cohort / "patients.csv")]
    _write_rows(cohort / "patients.csv", patients)   # no CBC column at all, as SCEMILA-like data
    args = ["--cohort", str(cohort), "--bags", str(bags)]
    # patient_features: [] alone is enough: log_features need not be emptied too.
    assert main(["cv", *args, "--out", str(tmp_path / "cv"), "-q", *SET, "data.patient_features=[]"]) == 0
    out = capsys.readouterr().out
    assert "cells only" in out and "CBC only" not in out
    assert "(no CBC-only baseline: data.patient_features is empty)" in out
    metrics = json.loads((tmp_path / "cv" / "metrics.json").read_text())
    assert metrics["baselines"] == {} and metrics["notes"] == ["no CBC-only baseline: data.patient_features is empty"]
    assert metrics["fusion"] == "none" and 0.0 <= metrics["patient"]["macro_auroc"]["mean"] <= 1.0
    assert main(["train", *args, "--out", str(tmp_path / "train"), "-q", *SET, "data.patient_features=[]"]) == 0
    assert main(["predict", "--run", str(tmp_path / "train"), *args, "--out", str(tmp_path / "pred"), "-q"]) == 0
    assert len(_rows(tmp_path / "pred" / "predictions.csv")) == 18


def test_predict_reads_an_absent_cbc_column_as_missing_and_says_so_once(tmp_path: Path, capsys) -> None:
    cohort, bags = planted_cohort(tmp_path, n_patients=18)
    args = ["--cohort", str(cohort), "--bags", str(bags)]
    assert main(["train", *args, "--out", str(tmp_path / "run"), "-q", *SET,
                 "data.patient_features=[wbc, hb]", "data.log_features=[wbc]"]) == 0
    capsys.readouterr()
    new = tmp_path / "new"
    new.mkdir()
    (new / "slides.csv").write_text((cohort / "slides.csv").read_text().replace(",src,", f",{cohort / 'src'},"))
    _write_rows(new / "patients.csv", [{"patient_id": r["patient_id"], "label": "", "hb": r["hb"]}
                                       for r in _rows(cohort / "patients.csv")])
    with pytest.warns(MissingFeatureWarning) as record:
        assert main(["predict", "--run", str(tmp_path / "run"), "--cohort", str(new), "--bags", str(bags),
                     "--out", str(tmp_path / "pred"), "-q"]) == 0
    said = [str(w.message) for w in record if w.category is MissingFeatureWarning]
    assert said == ["patients.csv has no column 'wbc', which the model reads: treated as missing for every patient"]
    assert len(_rows(tmp_path / "pred" / "predictions.csv")) == 18
    # Training still refuses it: a model must not learn from a column that is not there.
    code = main(["train", "--cohort", str(new), "--bags", str(bags), "--out", str(tmp_path / "again"), "-q", *SET,
                 "data.patient_features=[wbc, hb]", "data.classes=[healthy, disease]"])
    assert code == 2 and "required column 'wbc' is missing" in capsys.readouterr().err


def test_configs_with_the_old_cbc_key_names_still_load(tmp_path: Path) -> None:
    from milhema.config import load_config

    path = tmp_path / "old.yaml"
    path.write_text("data:\n  cbc_columns: [wbc, hb]\n  cbc_log_columns: [wbc]\n")
    with pytest.warns(FutureWarning, match="'data.cbc_columns' is now called 'data.patient_features'"):
        settings = load_config(path)
    assert settings.data.patient_features == ("wbc", "hb") and settings.data.log_features == ("wbc",)


def test_a_slide_whose_view_the_model_does_not_know_is_refused(tmp_path: Path, capsys) -> None:
    cohort, bags = planted_cohort(tmp_path, n_patients=12)
    slides = _rows(cohort / "slides.csv")
    slides[3]["view"] = "pb"   # a typo of PB: it used to become view 0 without a word
    _write_rows(cohort / "slides.csv", slides)
    args = ["--cohort", str(cohort), "--bags", str(bags), "-q", *SET, "data.patient_features=[wbc, hb]"]
    code = main(["cv", "--out", str(tmp_path / "mv"), *args, "model.name=multiview", "data.views=[PB, BM]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"milhema: error: slides.csv row 5: slide {slides[3]['slide_id']} has view 'pb', not one of "
                      "the model's views PB, BM (data.views); give it one of them or add it to data.views")
    # A model that pools all slides alike does not need views: the same cohort trains.
    assert main(["cv", "--out", str(tmp_path / "ab"), *args]) == 0


def test_predict_on_a_labelled_cohort_is_an_external_validation(tmp_path: Path, capsys) -> None:
    """Trained at one 'hospital' (planted cohort, seed 0), judged at another (seed 1): predict writes the
    same metrics as cv, with the CBC-only model of the training run applied to the new patients."""
    train_cohort, train_bags = planted_cohort(tmp_path / "a", n_patients=24, seed=0)
    new_cohort, new_bags = planted_cohort(tmp_path / "b", n_patients=20, seed=1)
    features = ["data.patient_features=[wbc, hb]", "data.log_features=[wbc]"]
    assert main(["cv", "--cohort", str(train_cohort), "--bags", str(train_bags), "--out", str(tmp_path / "run"),
                 "-q", *SET, "train.epochs=60", "train.lr=0.003", *features]) == 0
    saved = json.loads((tmp_path / "run" / "baselines" / "cbc_only.json").read_text())
    assert saved["columns"] == ["wbc", "hb"] and saved["classes"] == ["healthy", "disease"]
    capsys.readouterr()
    assert main(["predict", "--run", str(tmp_path / "run"), "--cohort", str(new_cohort), "--bags", str(new_bags),
                 "--out", str(tmp_path / "external"), "-q"]) == 0
    said = capsys.readouterr().out
    assert "20 patients have a label (0 predicted out of fold)" in said and "CBC only" in said
    metrics = json.loads((tmp_path / "external" / "metrics.json").read_text())
    assert metrics["n_patients"] == 20 and metrics["patient"]["balanced_accuracy"]["mean"] >= 0.7
    base = metrics["baselines"]["cbc_only"]["patient"]
    assert base["balanced_accuracy"]["mean"] < metrics["patient"]["balanced_accuracy"]["mean"]   # the CBC is noise
    assert set(metrics["patient"]) >= {"balanced_accuracy", "macro_auroc", "ece", "brier", "confusion_matrix"}
    assert metrics["coverage"]["curve"][-1]["coverage"] == 1.0
    assert (tmp_path / "external" / "classification.png").read_bytes()[:4] == b"\x89PNG"
    # A cohort without labels: predictions only, as before.
    rows = _rows(new_cohort / "patients.csv")
    for row in rows:
        row["label"] = ""
    _write_rows(new_cohort / "patients.csv", rows)
    assert main(["predict", "--run", str(tmp_path / "run"), "--cohort", str(new_cohort), "--bags", str(new_bags),
                 "--out", str(tmp_path / "unlabelled"), "-q"]) == 0
    assert not (tmp_path / "unlabelled" / "metrics.json").exists()
