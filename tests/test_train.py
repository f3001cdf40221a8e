from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from milhema.bags import write_bag
from milhema.config import load_config
from milhema.data import load_cohort
from milhema.errors import MilhemaError
from milhema.train.checkpoint import CheckpointError, load_checkpoint
from milhema.train.cv import run_cv
from milhema.train.data import BagStore, TrainingBags, bucketed_batches, collate
from milhema.train.inference import predict
from milhema.train.inputs import CBCEncoder, FeatureNorm
from milhema.train.loop import batch_hard_triplet
from milhema.train.predict import run_predict
from milhema.train.run import run_train

CLASSES = ["healthy", "disease"]


def planted_cohort(root: Path, n_patients: int = 24, dim: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Patients whose 'disease' bags hold ~15% cells shifted along feature 0; CBC is noise."""
    rng = np.random.default_rng(seed)
    cohort, bags = root / "cohort", root / "bags"
    (cohort / "src").mkdir(parents=True)
    patients, slides = ["patient_id,label,wbc,hb"], ["slide_id,patient_id,source,view"]
    for i in range(n_patients):
        label = CLASSES[i % 2]
        wbc = "" if i % 5 == 0 else f"{rng.lognormal(1.8, 0.4):.2f}"
        patients.append(f"P{i:02d},{label},{wbc},{rng.normal(12, 2):.1f}")
        for s in range(1 + i % 2):
            n = int(rng.integers(20, 50))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            planted = np.zeros(n, bool)
            if label == "disease":
                planted[rng.choice(n, max(2, n // 7), replace=False)] = True
                x[planted, 0] += 3.0
            sid = f"P{i:02d}_S{s}"
            slides.append(f"{sid},P{i:02d},src,{'PB' if s == 0 else 'BM'}")
            write_bag(bags / f"{sid}.h5", x, slide_id=sid, patient_id=f"P{i:02d}", diagnostic=planted,
                      cell_ids=[f"c{j}" for j in range(n)], backbone="test/planted")
    (cohort / "patients.csv").write_text("\n".join(patients) + "\n")
    (cohort / "slides.csv").write_text("\n".join(slides) + "\n")
    return cohort, bags


def _config(*extra: str) -> dict:
    return load_config(None, ["data.classes=[healthy, disease]", "data.patient_features=[wbc, hb]",
                              "data.log_features=[wbc]", "train.epochs=40", "train.batch_size=8",
                              "train.lr=0.003", "train.patience=40", "cv.folds=3", *extra])


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return planted_cohort(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def cv_run(planted, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    cohort_dir, bags = planted
    config = _config()
    cohort = load_cohort(cohort_dir, config.data.classes, config.data.patient_features)
    out = tmp_path_factory.mktemp("runs") / "cv"
    return out, run_cv(config, cohort, bags, out, progress=False)


def test_cbc_encoder_log_standardise_impute_and_indicate() -> None:
    raw = np.array([[10.0, 12.0], [np.nan, 14.0], [1.0, np.nan]], np.float32)
    enc = CBCEncoder(["wbc", "hb"], ["wbc"]).fit(raw)
    out = enc(torch.from_numpy(raw)).numpy()
    assert out.shape == (3, 4)
    assert out[1, 0] == 0.0 and out[1, 2] == 1.0 and out[2, 1] == 0.0 and out[2, 3] == 1.0
    assert out[0, 2] == 0.0 and out[0, 3] == 0.0
    expected = (np.log1p(10.0) - np.mean(np.log1p([10.0, 1.0]))) / np.std(np.log1p([10.0, 1.0]))
    assert out[0, 0] == pytest.approx(expected, rel=1e-5)
    assert np.isfinite(out).all()


def test_feature_norm_statistics() -> None:
    rng = np.random.default_rng(0)
    blocks = [rng.normal(5, 2, size=(n, 3)) for n in (10, 40, 7)]
    norm = FeatureNorm(3).fit(blocks)
    z = norm(torch.tensor(np.concatenate(blocks), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-4)


def test_collate_pads_masks_and_subsamples(planted) -> None:
    cohort_dir, bags = planted
    cohort = load_cohort(cohort_dir, CLASSES, ["wbc", "hb"])
    store = BagStore(cohort, bags, ["PB", "BM"])
    items = store.many(cohort.patient_ids[:4])
    batch = collate(items)
    lengths = [b.n_cells for b in items]
    assert batch.x.shape == (4, max(lengths), 12)
    assert batch.mask.sum(1).tolist() == lengths
    assert (batch.x[~batch.mask] == 0).all() and (batch.index[~batch.mask.numpy()] == -1).all()
    assert set(batch.view[1][batch.mask[1]].tolist()) == {0, 1}  # P01 has a PB and a BM slide
    small = collate([TrainingBags(items, 10, seed=0)[(0, i)] for i in range(len(items))])
    assert small.x.shape[1] == 10 and small.mask.all()
    seen = sorted(i for batch_idx in bucketed_batches(store.many(cohort.patient_ids).lengths, 5, np.random.default_rng(1))
                  for i in batch_idx)
    assert seen == list(range(len(cohort.patient_ids)))


def test_triplet_loss() -> None:
    y = torch.tensor([0, 0, 1, 1])
    far = torch.tensor([[1.0, 0], [1.0, 0.01], [-1.0, 0], [-1.0, 0.01]])
    assert float(batch_hard_triplet(far, y, margin=1.0)) == pytest.approx(0.0, abs=1e-4)
    mixed = torch.tensor([[1.0, 0], [-1.0, 0], [1.0, 0.01], [-1.0, 0.01]])
    assert float(batch_hard_triplet(mixed, y)) > 1.0


def test_cv_learns_the_planted_signal_and_writes_the_run(cv_run, planted) -> None:
    out, metrics = cv_run
    assert metrics["patient"]["balanced_accuracy"]["mean"] >= 0.7  # chance: 0.5
    assert metrics["patient"]["macro_auroc"]["mean"] >= 0.85
    assert metrics["baselines"]["cbc_only"]["patient"]["balanced_accuracy"]["mean"] < 0.8
    for key in ("balanced_accuracy", "macro_f1", "macro_auroc", "accuracy", "ece"):
        lo, hi = metrics["patient"][key]["ci95"]
        assert lo <= hi
    assert {"slide", "patient_from_slides", "baselines"} <= metrics.keys()
    # Faithfulness: out-of-fold attention and occlusion rank the planted (diagnostic) cells first.
    attention, occluded = metrics["attention"]["diagnostic_auroc"], metrics["occlusion"]["diagnostic_auroc"]
    assert attention["n_patients"] == occluded["n_patients"] == 12   # the 'disease' patients
    # Removing one of several planted cells moves the probability little: occlusion is near chance
    # here (0.497 with per-fold seeds); test_explain checks that it finds a single planted cell.
    assert attention["mean"] >= 0.8 and 0.3 < occluded["mean"] <= 1.0
    assert metrics["occlusion"]["attention_on_the_same_patients"] == attention   # here every patient is occluded
    assert metrics["n_patients"] == 24 and metrics["n_slides"] == 36 and metrics["folds"] == 3
    # Calibration: a temperature per fold, kept in its checkpoint; ECE/Brier before and after; coverage.
    temperatures = [json.loads((out / "checkpoints" / f"r0_f{k}.json").read_text())["temperature"] for k in range(3)]
    assert metrics["calibration"]["temperature"]["per_fold"] == [round(t, 4) for t in temperatures]
    assert all(0.05 <= t <= 20 for t in temperatures) and len(set(temperatures)) == 3
    assert set(metrics["calibration"]["ece"]) == {"before", "after"} and (out / "calibration.png").is_file()
    assert metrics["coverage"]["curve"][-1]["coverage"] == 1.0 and "brier" in metrics["patient"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["patient_id"] for r in rows) == [f"P{i:02d}" for i in range(24)]
    assert {r["fold"] for r in rows} == {"0", "1", "2"}
    assert all(abs(float(r["prob_healthy"]) + float(r["prob_disease"]) - 1) < 1e-4 for r in rows)
    with open(out / "slide_predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 36
    assert len(list((out / "cell_scores").glob("*.csv"))) == 36
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert {h["fold"] for h in history} == {0, 1, 2} and all("val_loss" in h for h in history)
    assert (out / "config.yaml").is_file() and not list(out.parent.glob(".*partial"))


def test_no_patient_leaks_across_folds_or_into_validation(cv_run) -> None:
    out, _ = cv_run
    tested = []
    for meta_path in sorted((out / "checkpoints").glob("*.json")):
        meta = json.loads(meta_path.read_text())
        test, train, val = set(meta["test_patients"]), set(meta["train_patients"]), set(meta["val_patients"])
        assert not test & train and not test & val and not train & val
        assert len(test | train | val) == 24
        tested += meta["test_patients"]
    assert sorted(tested) == [f"P{i:02d}" for i in range(24)]


def test_cell_scores_rank_planted_cells_first(cv_run, planted) -> None:
    out, _ = cv_run
    from sklearn.metrics import roc_auc_score

    from milhema.bags import read_bag

    aurocs = []
    for path in (out / "cell_scores").glob("*.csv"):
        bag = read_bag(planted[1] / f"{path.stem}.h5")
        if not bag.diagnostic.any():
            continue
        with open(path) as fh:
            rows = list(csv.DictReader(fh))
        assert [r["cell_id"] for r in rows] == list(bag.cell_ids)
        aurocs.append(roc_auc_score(bag.diagnostic, [float(r["score"]) for r in rows]))
        assert all(0 < float(r["rank_pct"]) <= 100 for r in rows)
    assert np.mean(aurocs) > 0.8


def test_predict_reproduces_out_of_fold_predictions(cv_run, planted, tmp_path: Path) -> None:
    out, _ = cv_run
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    result = run_predict(out, cohort, planted[1], tmp_path / "pred")
    with open(out / "predictions.csv") as fh:
        oof = {r["patient_id"]: float(r["prob_disease"]) for r in csv.DictReader(fh)}
    for pid, prob in zip(result["patient_ids"], result["probs"][:, 1], strict=True):
        assert prob == pytest.approx(oof[pid], abs=1e-5)
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["n_models"] == "1" for r in rows)
    # confidence = the (calibrated) probability of the predicted class
    assert all(r["confidence"] == f"{max(float(r['prob_healthy']), float(r['prob_disease'])):.6f}" for r in rows)
    ensemble = run_predict(out, cohort, planted[1], tmp_path / "ens", ensemble=True)
    assert not np.allclose(ensemble["probs"], result["probs"])


def test_checkpoint_round_trip_and_mismatched_bags(cv_run, planted, tmp_path: Path) -> None:
    out, _ = cv_run
    model, meta = load_checkpoint(out / "checkpoints" / "r0_f0")
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    store = BagStore(cohort, planted[1], meta["spec"]["views"])
    bags = store.many(meta["test_patients"])
    first = predict(model, bags, 4, device=torch.device("cpu"))
    again = predict(load_checkpoint(out / "checkpoints" / "r0_f0")[0], bags, 3, device=torch.device("cpu"))
    np.testing.assert_allclose(first.probs, again.probs, atol=1e-6)
    other, other_bags = planted_cohort(tmp_path / "other", n_patients=4, dim=8)
    with pytest.raises(CheckpointError, match="8"):
        run_predict(out, load_cohort(other, CLASSES, ["wbc", "hb"]), other_bags, tmp_path / "p")


def test_predictions_ignore_cell_order_and_padding(cv_run, planted) -> None:
    out, _ = cv_run
    model, meta = load_checkpoint(out / "checkpoints" / "r0_f1")
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    bags = BagStore(cohort, planted[1], meta["spec"]["views"]).many(cohort.patient_ids[:6])
    alone = np.concatenate([predict(model, [b], 1, device=torch.device("cpu")).probs for b in bags])
    together = predict(model, bags, 6, device=torch.device("cpu"))  # padded to the longest bag
    np.testing.assert_allclose(alone, together.probs, atol=1e-5)
    rng = np.random.default_rng(0)
    for bag in bags:
        perm = rng.permutation(bag.n_cells)
        shuffled = type(bag)(bag.patient_id, bag.label, bag.features[perm], bag.slide_index[perm],
                             bag.view_index[perm], bag.coords[perm], bag.cell_ids[perm], bag.slide_ids, bag.cbc)
        a = predict(model, [bag], 1, device=torch.device("cpu"))
        b = predict(model, [shuffled], 1, device=torch.device("cpu"))
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        np.testing.assert_allclose(a.cell_scores[0][perm], b.cell_scores[0], atol=1e-6)


def test_train_run_and_existing_folder(planted, tmp_path: Path) -> None:
    config = _config("train.epochs=5")
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    metrics = run_train(config, cohort, planted[1], tmp_path / "run", progress=False)
    assert metrics["n_train"] + metrics["n_val"] == 24 and metrics["epochs_run"] >= 1
    # Named for what it is: the split that chose the epoch, not a test set.
    assert "validation" not in metrics and metrics["early_stopping_split"]["balanced_accuracy"]["mean"] >= 0
    assert metrics["note"].startswith("the metrics are on the validation patients that chose the stopping epoch")
    assert (tmp_path / "run" / "checkpoints" / "model.safetensors").is_file()
    with pytest.raises(MilhemaError, match="already exists"):
        run_train(config, cohort, planted[1], tmp_path / "run", progress=False)
    result = run_predict(tmp_path / "run", cohort, planted[1], tmp_path / "pred")
    assert result["probs"].shape == (24, 2)


def test_no_validation_split_trains_on_every_training_patient_for_the_set_epochs(planted, tmp_path: Path) -> None:
    # train.val_fraction 0: no early stopping, no temperature; the folds keep every training patient.
    config = _config("train.val_fraction=0", "train.epochs=6", "train.patience=1")
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    metrics = run_train(config, cohort, planted[1], tmp_path / "train", progress=False)
    assert (metrics["n_train"], metrics["n_val"], metrics["epochs_run"], metrics["temperature"]) == (24, 0, 6, 1.0)
    assert metrics["note"].startswith("train.val_fraction is 0") and "early_stopping_split" not in metrics
    assert run_predict(tmp_path / "train", cohort, planted[1], tmp_path / "pred")["probs"].shape == (24, 2)
    cv = run_cv(config, cohort, planted[1], tmp_path / "cv", progress=False)
    for k in range(3):
        meta = json.loads((tmp_path / "cv" / "checkpoints" / f"r0_f{k}.json").read_text())
        assert meta["val_patients"] == [] and meta["temperature"] == 1.0
        assert sorted(meta["train_patients"] + meta["test_patients"]) == [f"P{i:02d}" for i in range(24)]
    history = [json.loads(line) for line in (tmp_path / "cv" / "history.jsonl").read_text().splitlines()]
    assert [sum(h["fold"] == k for h in history) for k in range(3)] == [6, 6, 6]   # patience 1 never stopped it
    assert not any("val_loss" in h for h in history)
    assert cv["calibration"]["method"].startswith("none: train.val_fraction is 0")
    assert cv["calibration"]["ece"]["before"] == pytest.approx(cv["calibration"]["ece"]["after"], abs=1e-7)
    with pytest.raises(MilhemaError, match="train.val_fraction must be at least 0"):
        _config("train.val_fraction=-0.1")


def test_cv_refuses_too_few_patients_per_class(planted, tmp_path: Path) -> None:
    config = _config("cv.folds=20")
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    with pytest.raises(MilhemaError, match="needs at least 20 patients of every class"):
        run_cv(config, cohort, planted[1], tmp_path / "cv", progress=False)
    assert not (tmp_path / "cv").exists()


def test_feature_blocks_select_columns(tmp_path: Path) -> None:
    from milhema.errors import BagError
    from milhema.train.data import block_columns

    attrs = {"feature_blocks": "timm/resnet18:4,morphology:3"}
    assert block_columns(attrs, ["morphology"], "s") == (4, 5, 6)
    assert block_columns(attrs, ["timm/resnet18"], "s") == (0, 1, 2, 3)
    assert block_columns(attrs, None, "s") is None
    with pytest.raises(BagError, match="asks for morph but the bag holds timm/resnet18, morphology"):
        block_columns(attrs, ["morph"], "s")
    with pytest.raises(BagError, match="not embedded by milhema"):
        block_columns({}, ["morphology"], "s")


def test_same_seed_repeats_a_cpu_run_exactly(planted, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config = _config("train.epochs=3")
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    for name in ("a", "b"):
        run_train(config, cohort, planted[1], tmp_path / name, progress=False)
    a = load_file(str(tmp_path / "a" / "checkpoints" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "history.jsonl").read_text() == (tmp_path / "b" / "history.jsonl").read_text()


def test_patients_without_cells_are_named_in_a_warning(tmp_path: Path) -> None:
    from milhema.train.data import EmptyBagWarning

    cohort_dir, bags = planted_cohort(tmp_path, n_patients=12)
    write_bag(bags / "P02_S0.h5", np.zeros((0, 12), np.float32), slide_id="P02_S0", patient_id="P02",
              cell_ids=[], backbone="test/planted")
    cohort = load_cohort(cohort_dir, CLASSES, ["wbc", "hb"])
    with pytest.warns(EmptyBagWarning, match=r"1 patient without any cell in their bags \(P02\)"):
        metrics = run_train(_config("train.epochs=2"), cohort, bags, tmp_path / "run", progress=False)
    assert metrics["n_patients"] == 12  # kept, with the CBC alone


def test_cell_scores_are_float32_even_under_a_callers_autocast(cv_run, planted) -> None:
    """bf16 rounds attention logits into ties (issue: 400 distinct scores became 148-327); inference
    computes in float32 whatever autocast its caller runs under."""
    out, _ = cv_run
    model, meta = load_checkpoint(out / "checkpoints" / "r0_f0")
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    bags = BagStore(cohort, planted[1], meta["spec"]["views"]).many(cohort.patient_ids[:6])
    reference = predict(model, bags, 6, device=torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = predict(model, bags, 6, device=torch.device("cpu"))
    for a, b in zip(reference.cell_scores, under_amp.cell_scores, strict=True):
        np.testing.assert_array_equal(a, b)
        assert len(np.unique(b)) == len(b)   # no ties among the cells of a bag
    np.testing.assert_array_equal(reference.probs, under_amp.probs)
    # What float32 avoids: the same forward pass in bf16 ties cells (the old CUDA evaluation path).
    batch = collate(list(bags))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.eval()(batch).cell_scores
    tied = sum(len(s) - len(np.unique(s.float().numpy()[: len(s)])) for s in scores[batch.mask].split(
        batch.mask.sum(1).tolist()))
    assert tied > 0


def test_each_fold_starts_from_its_own_seed(cv_run, planted) -> None:
    """The spread over folds and repeats includes initialisation: seeds derive from (train.seed, repeat, fold)."""
    from milhema.train.run import fold_seed, prepare, train_model

    out, _ = cv_run
    seeds = [json.loads((out / "checkpoints" / f"r0_f{k}.json").read_text())["seed"] for k in range(3)]
    assert seeds == [fold_seed(0, 0, k) for k in range(3)] and len(set(seeds)) == 3
    assert fold_seed(0, 1, 0) not in seeds and fold_seed(0, 0, 0) == seeds[0]   # repeats differ; same key, same seed
    config = _config("train.epochs=1")
    cohort = load_cohort(planted[0], CLASSES, ["wbc", "hb"])
    prep = prepare(config, cohort, planted[1])
    ids = prep.ids[:12]
    first = [train_model(config, prep.store, prep.spec, ids, [], torch.device("cpu"), None, False, "t", seed=s)[0]
             for s in (seeds[0], seeds[0], seeds[1])]
    weights = [m.mil.head.weight.detach() for m in first]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_occluded_patients_are_a_stratified_random_subset() -> None:
    """Not the first test patients of each fold in file order: every class is represented."""
    from milhema.train.cv import _occlusion_subset

    ids = [f"P{i:02d}" for i in range(24)]
    strata = np.array([0] * 18 + [1] * 6)   # the minority class sits at the end of the file
    chosen = _occlusion_subset(ids, strata, 8, seed=0)
    assert len(chosen) == 8 and sum(int(p[1:]) >= 18 for p in chosen) == 2   # 8 x 6/24
    assert chosen == _occlusion_subset(ids, strata, 8, seed=0) != _occlusion_subset(ids, strata, 8, seed=1)
    assert _occlusion_subset(ids, strata, 0, 0) == frozenset() and _occlusion_subset(ids, strata, 40, 0) == set(ids)
