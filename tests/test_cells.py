"""Cell-level learning (``milhema cells train|predict``) and the predicted differential count.

The round trip runs the real command line on a small simulated cohort embedded with the handcrafted
morphology features: annotations from the simulator's cells.csv, a patient-grouped cv, predictions
written into the bags (format version 2), the differential as patient features of ``milhema cv``
and in ``milhema predict``'s outputs.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from milhema.bags import read_bag, read_bag_attrs, validate_bag, write_bag
from milhema.cells.annotations import gather
from milhema.cells.losses import asymmetric_loss, class_weights
from milhema.cli import main
from milhema.config import DEFAULTS, load_config
from milhema.data import load_cohort
from milhema.differential import cell_differential, estimate, poisson_binomial
from milhema.errors import MilhemaError


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread (tiny matrices: threads only cost, and the test machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

CLASSES = DEFAULTS["data"]["classes"]
EMBED = ["--backbone", "none", "--morphology", "--workers", "0", "-q"]
TRAIN = ["--folds", "3", "--set", "cells.head=mlp", "cells.epochs=80", "cells.patience=20", "-q"]


@dataclass(frozen=True)
class Cells:
    """A simulated cohort, its bags before (``plain``) and after ``cells predict`` (``bags``), and the run."""

    cohort: Path
    plain: Path
    bags: Path
    run: Path
    metrics: dict


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Cells:
    root = tmp_path_factory.mktemp("cells")
    cohort, plain, bags, run = root / "cohort", root / "plain", root / "bags", root / "run"
    with one_thread():
        assert main(["synth", "--out", str(cohort), "--patients", "16", "--seed", "3", "--cells", "40",
                     "--crop-px", "64", "--difficulty", "easy", "--workers", "1", "-q"]) == 0
        assert main(["embed", "--cohort", str(cohort), "--out", str(plain), *EMBED]) == 0
        assert main(["cells", "train", "--cohort", str(cohort), "--bags", str(plain), "--out", str(run), *TRAIN]) == 0
        shutil.copytree(plain, bags)
        assert main(["cells", "predict", "--run", str(run), "--bags", str(bags), "-q"]) == 0
    return Cells(cohort, plain, bags, run, json.loads((run / "metrics.json").read_text()))


def test_types_are_learnt_above_chance_on_held_out_patients(cells: Cells) -> None:
    m = cells.metrics
    t = m["type_metrics"]
    assert m["n_patients"] == 16 and m["folds"] == 3 and m["n_cells"] == m["annotations"]["annotated"] > 300
    assert t["balanced_accuracy"]["mean"] >= max(0.4, 4 * t["chance_balanced_accuracy"]), t["balanced_accuracy"]
    lo, hi = t["balanced_accuracy"]["ci95"]
    assert lo <= t["balanced_accuracy"]["mean"] <= hi
    # Lymphocytes and neutrophils differ in size and lobes: the morphology features tell them apart.
    assert t["per_type"]["lymphocyte"]["recall"] > 0.8 and t["per_type"]["neutrophil"]["precision"] > 0.8
    counts = np.array(t["confusion_matrix"]["counts"])
    assert counts.sum() == m["n_cells"] and counts.shape == (15, 15)
    assert [v["support"] for v in t["per_type"].values()] == counts.sum(axis=1).tolist()
    # Out-of-fold probabilities are calibrated (temperature scaling minimises the validation NLL, not the
    # ECE: on a classifier already calibrated it may move the ECE a little either way).
    ece = m["calibration"]["ece"]
    assert ece["after"] < 0.05 and ece["after"] <= ece["before"] + 0.01, ece
    assert m["differential"]["mae_pp_mean_over_types"] < 5.0
    files = {p.relative_to(cells.run).as_posix() for p in cells.run.rglob("*") if p.is_file()}
    assert {"config.yaml", "classifier.json", "metrics.json", "confusion.png", "cell_predictions.csv",
            "history.jsonl", "classifier/fold0.safetensors", "classifier/fold2.json"} <= files
    assert Image.open(cells.run / "confusion.png").size[0] > 300
    assert not list(cells.run.parent.glob(".*partial"))


def test_anomaly_head_on_simulated_attributes(cells: Cells) -> None:
    attributes = cells.metrics["attribute_metrics"]
    assert list(attributes) == ["vacuoles", "hypogranular", "pseudo_pelger", "auer_rod"]
    vacuoles = attributes["vacuoles"]
    assert vacuoles["positives"] >= 5
    # The morphology features count vacuoles: the head finds the vacuolated cells.
    assert vacuoles["auroc"]["mean"] > 0.85 and vacuoles["average_precision"]["mean"] > vacuoles["prevalence"]
    assert cells.metrics["attribute_loss"]["name"] == "asymmetric"


def test_predictions_in_the_bags_are_version_2_and_nothing_else_changed(cells: Cells) -> None:
    fingerprint = json.loads((cells.run / "classifier.json").read_text())["fingerprint"]
    for path in sorted(cells.bags.glob("*.h5")):
        before, after = read_bag(cells.plain / path.name), read_bag(path)
        assert before.attrs["format_version"] == 1 and before.predictions is None   # a version-1 bag still reads
        assert after.attrs["format_version"] == 2 and validate_bag(path)["n_cells"] == before.n_cells
        assert np.array_equal(after.features, before.features) and np.array_equal(after.thumbnails, before.thumbnails)
        assert list(after.cell_ids) == list(before.cell_ids) and after.attrs["embed_signature"] == before.attrs[
            "embed_signature"]
        pred = after.predictions
        assert pred.classifier_sha256 == fingerprint and pred.type_names == tuple(DEFAULTS["cells"]["types"])
        assert pred.type_probs.shape == (before.n_cells, 15) and np.allclose(pred.type_probs.sum(axis=1), 1, atol=1e-4)
        assert pred.attribute_names == ("vacuoles", "hypogranular", "pseudo_pelger", "auer_rod")
        info = json.loads(pred.info)
        # Every slide's patient was held out by one fold: its own cells never trained the model that predicted them.
        assert info["model"].startswith("fold ") and "held out" in info["model"]
    assert not list(cells.bags.glob(".*"))


def test_predict_resumes_refuses_another_classifier_and_uses_the_ensemble_for_new_slides(
        cells: Cells, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bags = tmp_path / "bags"
    shutil.copytree(cells.bags, bags)
    capsys.readouterr()
    assert main(["cells", "predict", "--run", str(cells.run), "--bags", str(bags), "--cohort", str(cells.cohort)]) == 0
    assert "already carry the predictions" in capsys.readouterr().out
    other = tmp_path / "other"
    with one_thread():
        assert main(["cells", "train", "--cohort", str(cells.cohort), "--bags", str(cells.plain), "--out", str(other),
                     "--folds", "2", "--set", "cells.epochs=5", "-q"]) == 0
    before = {p.name: p.read_bytes() for p in bags.glob("*.h5")}
    assert main(["cells", "predict", "--run", str(other), "--bags", str(bags), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already carries the predictions of another cell classifier" in err
    assert {p.name: p.read_bytes() for p in bags.glob("*.h5")} == before   # checked before anything is written
    assert main(["cells", "predict", "--run", str(other), "--bags", str(bags), "--overwrite", "-q"]) == 0
    # A slide the run never saw (another hospital's bag under a known id) gets the mean of the fold models.
    path = bags / sorted(before)[0]
    bag = read_bag(cells.plain / path.name)
    write_bag(path, bag.features[::-1].copy(), slide_id=bag.slide_id, patient_id=bag.patient_id,
              cell_ids=list(bag.cell_ids[::-1]), backbone=bag.backbone, mpp=0.375, crop_px=64,
              extra_attrs={k: bag.attrs[k] for k in ("feature_blocks", "morphology_features")})
    assert main(["cells", "predict", "--run", str(cells.run), "--bags", str(bags), "--overwrite", "-q"]) == 0
    assert json.loads(read_bag(path).predictions.info)["model"] == "mean of the 3 fold models"


def test_differential_is_a_patient_feature_and_a_predict_output(cells: Cells, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, out = tmp_path / "cv", tmp_path / "pred"
    features = ["--set", "data.patient_features=[wbc, diff_blast, diff_reactive_lymphocyte, anomaly_vacuoles]",
                "data.log_features=[wbc]", "train.epochs=3", "model.hidden_dim=8", "tracking.mode=offline"]
    with one_thread():
        assert main(["cv", "--cohort", str(cells.cohort), "--bags", str(cells.bags), "--out", str(run), "--folds", "2",
                     *features, "-q"]) == 0
        meta = json.loads((run / "checkpoints" / "r0_f0.json").read_text())
        fingerprint = json.loads((cells.run / "classifier.json").read_text())["fingerprint"]
        assert meta["bags"]["cell_classifier_sha256"] == fingerprint
        assert meta["spec"]["cbc_columns"] == ["wbc", "diff_blast", "diff_reactive_lymphocyte", "anomaly_vacuoles"]
        assert main(["predict", "--run", str(run), "--cohort", str(cells.cohort), "--bags", str(cells.bags),
                     "--out", str(out), "-q"]) == 0
    # The run's own patients are predicted out of fold; its CBC-only model was fitted on them: no in-sample baseline.
    validation = json.loads((out / "metrics.json").read_text())
    assert validation["out_of_fold_patients"] == 16 and "cbc_only" not in validation["baselines"]
    assert "fitted on the 16 run patients" in validation["baselines_note"]
    with open(out / "differential.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cohort = load_cohort(cells.cohort, CLASSES, ())
    assert len(rows) == 15 * (len(cohort.patients) + len(cohort.slides))
    pooled = [r for r in rows if r["slide_id"] == ""]
    for pid in cohort.patient_ids:
        mine = [r for r in pooled if r["patient_id"] == pid]
        # Percent of the counted white cells (smudge cells, as in a manual differential, are not counted).
        assert sum(float(r["percent"]) for r in mine if r["type"] != "smudge") == pytest.approx(100, abs=0.2)
        assert all(float(r["ci_low"]) <= float(r["percent"]) <= float(r["ci_high"]) for r in mine)
    with open(out / "anomalies.csv", encoding="utf-8") as fh:
        assert {r["attribute"] for r in csv.DictReader(fh)} == {"vacuoles", "hypogranular", "pseudo_pelger", "auer_rod"}
    # W&B's predictions table shows each patient's predicted differential beside the prediction.
    (table,) = (run / "wandb").rglob("predictions_*.table.json")
    logged = json.loads(table.read_text())
    blast = logged["columns"].index("diff_blast")
    by_pseudonym = sorted(row[blast] for row in logged["data"])
    assert by_pseudonym == pytest.approx(sorted(float(r["percent"]) for r in pooled if r["type"] == "blast"), abs=0.01)
    # The report shows the predicted differential (expected counts, the same percentages as predict's).
    first = cohort.patient_ids[0]
    with one_thread():
        assert main(["explain", "--run", str(run), "--cohort", str(cells.cohort), "--bags", str(cells.bags),
                     "--out", str(tmp_path / "why"), "--patient", first, "-q"]) == 0
    report = (tmp_path / "why" / first / "report.html").read_text(encoding="utf-8")
    assert "of the predicted cells" in report and f"predicted by cell classifier {fingerprint[:12]}" in report
    with open(tmp_path / "why" / first / "differential.csv", encoding="utf-8") as fh:
        shown = {r["cell_type"]: r for r in csv.DictReader(fh) if not r["group"]}
    for r in pooled:
        if r["patient_id"] == first and r["type"] != "smudge":   # the report lists smudge cells, uncounted
            assert float(shown[r["type"]]["percent"].rstrip(" %")) == pytest.approx(float(r["percent"]), abs=0.06)
    # From Python too: the bag files of one patient, the differential computed from their predictions.
    import milhema

    api = milhema.load_run(run, device="cpu")
    pid = cohort.patient_ids[0]
    paths = [cells.bags / f"{s.slide_id}.h5" for s in cohort.slides_of(pid)]
    with one_thread():
        result = api.predict_bags(paths, cbc={"wbc": 5.0}, patient_id=pid)
    assert result.probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert float(result.bag.cbc[1]) == pytest.approx(float(next(r["percent"] for r in pooled
                                                                  if r["patient_id"] == pid and r["type"] == "blast")),
                                                     abs=0.01)
    with pytest.raises(MilhemaError, match="no cell_type_probs"):
        api.predict_bags([cells.plain / path.name for path in paths])
    # Bags without predictions: the run that reads the differential cannot predict from them, in one line.
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--cohort", str(cells.cohort), "--bags", str(cells.plain),
                 "--out", str(tmp_path / "p2"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no cell_type_probs" in err and "milhema cells predict" in err


@pytest.mark.parametrize(("case", "fragment"), [
    ("typo", "which the bags' cell classifier does not predict (did you mean 'diff_blast'?)"),
    ("column", "has a column 'diff_blast', but patient features named diff_ or anomaly_"),
])
def test_differential_feature_errors_are_one_line(case: str, fragment: str, cells: Cells, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    slides = (cells.cohort / "slides.csv").read_text().replace(",slides/", f",{cells.cohort}/slides/")
    (cohort / "slides.csv").write_text(slides)
    patients = (cells.cohort / "patients.csv").read_text().splitlines()
    if case == "column":
        patients = [patients[0] + ",diff_blast", *(row + ",1" for row in patients[1:])]
    (cohort / "patients.csv").write_text("\n".join(patients) + "\n")
    feature = "diff_blasts" if case == "typo" else "diff_blast"
    capsys.readouterr()
    assert main(["train", "--cohort", str(cohort), "--bags", str(cells.bags), "--out", str(tmp_path / "run"),
                 "--set", f"data.patient_features=[{feature}]", "data.log_features=[]", "train.epochs=1", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def _annotated_bags(root: Path, types_per_slide: dict[str, list[str]]) -> Path:
    """A cohort of one patient per slide whose bags carry ``cell_types`` (features: the type one-hot + noise)."""
    rng = np.random.default_rng(0)
    (root / "bags").mkdir(parents=True)
    (root / "src").mkdir()
    names = sorted({t for ts in types_per_slide.values() for t in ts})
    rows = []
    for i, (slide, types) in enumerate(types_per_slide.items()):
        x = 2.0 * np.eye(len(names))[[names.index(t) for t in types]] + rng.normal(0, 0.2, (len(types), len(names)))
        write_bag(root / "bags" / f"{slide}.h5", x, slide_id=slide, patient_id=f"P{i}", cell_types=types)
        rows.append(f"{slide},P{i},src")
    (root / "patients.csv").write_text("patient_id,label\n" + "".join(f"P{i},AML\n" for i in range(len(rows))))
    (root / "slides.csv").write_text("slide_id,patient_id,source\n" + "\n".join(rows) + "\n")
    return root


def test_unknown_types_are_counted_never_mapped_and_merge_maps(tmp_path: Path) -> None:
    root = _annotated_bags(tmp_path, {"S1": ["neutrophil", "Band", "band", "Blast", "", "unmatched", "lymphocyte"],
                                      "S2": ["Blast", "lymphocyte", "Stab", "neutrophil"]})
    cohort = load_cohort(root, CLASSES, ())
    types = [t for t in DEFAULTS["cells"]["types"] if t != "band"]
    settings = load_config(None, [f"cells.types=[{', '.join(types)}]", "cells.merge={band: neutrophil, Stab: neutrophil}"])
    found = gather(cohort, root / "bags", settings.cells)
    report = found.report
    assert report.unknown == {"Blast": 2, "Band": 1} and report.merged == {"band": 1, "Stab": 1}
    assert report.not_annotated == 2 and report.annotated == 6 and report.cells == 11
    assert [found.types[y] for y in found.y] == ["neutrophil", "neutrophil", "lymphocyte", "lymphocyte", "neutrophil",
                                                 "neutrophil"]
    summary = " ".join(report.summary(settings.cells))
    assert "'Blast' (2 cells; did you mean 'blast'?)" in summary and "band -> neutrophil (1)" in summary
    assert report.as_dict(settings.cells)["unknown"]["Band"] == {"cells": 1, "closest": "band"}
    assert found.attributes.shape == (6, 0) and found.attribute_names == ()


def test_a_collection_without_patients_is_split_by_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A class-folder dataset (public single-cell collections) is one 'patient': folds over its cells, stratified."""
    types = ["neutrophil"] * 30 + ["lymphocyte"] * 30 + ["monocyte"] * 24
    root = _annotated_bags(tmp_path, {"PBC": types})
    with one_thread():
        assert main(["cells", "train", "--cohort", str(root), "--bags", str(root / "bags"), "--out",
                     str(tmp_path / "run"), "--folds", "3", "--set", "cells.epochs=30", "-q"]) == 0
    assert "3-fold cv by cell (no patients to group by)" in capsys.readouterr().out
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["evaluation"].startswith("out of fold, by cell") and m["n_patients"] == 1
    folds = {r["fold"] for r in csv.DictReader(open(tmp_path / "run" / "cell_predictions.csv", encoding="utf-8"))}
    assert folds == {"0", "1", "2"}
    t = m["type_metrics"]
    low, high = t["balanced_accuracy"]["ci95"]
    assert t["balanced_accuracy"]["mean"] > 0.9 and low <= t["balanced_accuracy"]["mean"] <= high


@pytest.mark.parametrize(("argv", "fragment"), [
    (["train", "--folds", "5"], "2 patients have annotated cells: too few for 5 patient-grouped folds"),
    (["train", "--set", "cells.attributes=[vacuole]"], "cells.attributes names 'vacuole', which no annotated bag"),
    (["train", "--set", "cells.merge={Blast: blasts}"], "cells.merge maps to 'blasts', which cells.types does not list"),
    (["predict", "--run", "RUN"], "is not a milhema cells run folder (no classifier.json)"),
    (["train", "--set", "cells.types=[basophil, eosinophil]", "cells.neutrophil_types=[]"],
     "no annotated cell of a type in cells.types"),
])
def test_cells_errors_are_one_line(argv: list[str], fragment: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = _annotated_bags(tmp_path / "c", {"S1": ["neutrophil", "lymphocyte"] * 3, "S2": ["lymphocyte", "Blast"] * 3})
    where = ["--cohort", str(root), "--bags", str(root / "bags")]
    argv = [a.replace("RUN", str(tmp_path)) for a in argv]
    full = ["cells", argv[0], *(where if argv[0] == "train" else ["--bags", str(root / "bags")]),
            *(["--out", str(tmp_path / "out")] if argv[0] == "train" else []), *argv[1:], "-q"]
    capsys.readouterr()
    assert main(full) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("milhema: error: ") and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_bags_of_other_features(cells: Cells, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bags = tmp_path / "bags"
    bags.mkdir()
    write_bag(bags / "X1.h5", np.zeros((3, 8)), slide_id="X1", patient_id="P1", backbone="timm/resnet18")
    capsys.readouterr()
    assert main(["cells", "predict", "--run", str(cells.run), "--bags", str(bags), "-q"]) == 2
    err = capsys.readouterr().err
    assert "bag made with timm/resnet18 (8 features) but the cell classifier" in err and err.count("\n") == 1
    assert read_bag_attrs(bags / "X1.h5")["format_version"] == 1
    with h5py.File(bags / "X1.h5") as f:
        assert "cell_type_probs" not in f


# --- the losses ----------------------------------------------------------------------------------

def test_asymmetric_loss_ignores_easy_negatives_and_unannotated_cells() -> None:
    logits = torch.tensor([[-6.0, 2.0], [3.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[0, -1], [1, -1]])   # column 1 is not annotated: no gradient
    asymmetric_loss(logits, targets, gamma_neg=4, gamma_pos=0, clip=0.05).backward()
    grad = logits.grad
    assert grad[0, 0] == 0   # p = 0.0025 < clip: an easy negative costs nothing
    assert grad[1, 0] < 0 and grad[0, 1] == 0 and grad[1, 1] == 0
    # A positive keeps the full cross-entropy gradient: -(1 - p) / 2 entries.
    assert float(grad[1, 0]) == pytest.approx(-(1 - torch.sigmoid(torch.tensor(3.0)).item()) / 2, rel=1e-5)
    assert class_weights(np.array([0, 0, 0, 1]), 3).tolist() == [pytest.approx(2 / 3), 2.0, 0.0]


# --- the differential's interval -----------------------------------------------------------------

def test_poisson_binomial_and_a_perfect_classifier() -> None:
    assert np.allclose(poisson_binomial(np.array([[0.5, 0.5], [1.0, 0.0]])), [[0.25, 0.5, 0.25], [0, 1, 0]])
    perfect = estimate(np.r_[np.ones(10), np.zeros(190)], 200)
    # Jeffreys' binomial interval of 10 / 200 (scipy's beta quantiles): nothing added by the classifier.
    assert perfect.percent == pytest.approx(5.0) and (perfect.low, perfect.high) == pytest.approx((2.60, 8.69), abs=0.01)
    none_seen = estimate(np.zeros(200), 200)
    assert none_seen.low == 0.0 and 0.9 < none_seen.high < 1.5
    unsure = estimate(np.full(200, 0.05), 200)   # the same expected count, from an unsure classifier
    assert unsure.percent == pytest.approx(5.0) and unsure.high - unsure.low > perfect.high - perfect.low
    assert np.isnan(estimate(np.zeros(0), 0).percent)


def test_differential_intervals_cover_the_truth_in_a_simple_simulation() -> None:
    """Patients with true proportions pi; cells drawn from them; a calibrated classifier (each cell's
    probability q, its type drawn with probability q): the 95 % intervals hold pi in >= 93 % of patients
    and the annotated percentage of the counted cells in >= 95 %, for sure and unsure classifiers."""
    rng = np.random.default_rng(7)
    for concentration in (0.5, 5.0, 200.0):   # unsure ... nearly certain per cell
        hold_pi, hold_counted, widths = [], [], []
        for _ in range(300):
            pi = rng.uniform(0.0, 0.4)
            n = int(rng.integers(40, 400))
            q = rng.beta(concentration * max(pi, 1e-3) + 1e-3, concentration * (1 - pi) + 1e-3, n)
            counted = rng.random(n) < q
            est = estimate(q, n)
            hold_pi.append(est.low <= 100 * pi <= est.high)
            hold_counted.append(est.low - 1e-9 <= 100 * counted.mean() <= est.high + 1e-9)
            widths.append(est.high - est.low)
        assert np.mean(hold_pi) >= 0.93, (concentration, np.mean(hold_pi))
        assert np.mean(hold_counted) >= 0.95, (concentration, np.mean(hold_counted))
        assert np.mean(widths) < 25
    probs = rng.dirichlet(np.ones(4), 50)
    rows = cell_differential(probs)
    assert sum(r.percent for r in rows) == pytest.approx(100) and all(r.n == 50 for r in rows)


def test_loss_and_config_choices_reach_the_run(tmp_path: Path) -> None:
    root = _annotated_bags(tmp_path, {f"S{i}": ["neutrophil", "lymphocyte", "monocyte"] * 8 for i in range(4)})
    cohort = load_cohort(root, CLASSES, ())
    settings = load_config(None, ["cells.folds=2", "cells.epochs=30", "cells.head=linear"])
    from milhema.cells.run import run_cells_train

    with one_thread():
        metrics = run_cells_train(settings, cohort, root / "bags", tmp_path / "run", progress=False)
    assert metrics["type_metrics"]["balanced_accuracy"]["mean"] > 0.9   # separable by construction
    assert metrics["head"] == "linear" and "attribute_metrics" not in metrics
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.cells.head == "linear" and saved.cells.folds == 2
    with pytest.raises(MilhemaError, match="already exists"):
        run_cells_train(settings, cohort, root / "bags", tmp_path / "run", progress=False)
