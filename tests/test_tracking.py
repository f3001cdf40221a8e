"""W&B tracking: real offline runs in temporary folders, read back from the files W&B wrote."""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from milhema.bags import write_bag
from milhema.cli import build_parser, main
from milhema.config import DEFAULTS, dump_config, load_config
from milhema.data import load_cohort
from milhema.errors import ConfigError, TrackingError, TrackingWarning
from milhema.privacy import Pseudonymizer, load_or_create_salt, salt_path
from milhema.tracking import effective_mode, flatten_metrics, offline_runs, start_tracker
from milhema.train.cv import run_cv
from milhema.train.run import run_train

CLASSES = ["healthy", "disease"]
REPO = Path(__file__).resolve().parents[1]


def identified_cohort(root: Path, prefix: str, n_patients: int = 8) -> tuple[Path, Path, list[str]]:
    """Small planted cohort whose ids look like hospital record numbers; returns every patient and slide id."""
    rng = np.random.default_rng(3)
    cohort, bags = root / "cohort", root / "bags"
    (cohort / "src").mkdir(parents=True)
    patients, slides, ids = ["patient_id,label,wbc,hb"], ["slide_id,patient_id,source,view"], []
    for i in range(n_patients):
        pid, label = f"{prefix}{48213 + 7 * i}", CLASSES[i % 2]
        patients.append(f"{pid},{label},{rng.lognormal(1.8, 0.4):.2f},{rng.normal(12, 2):.1f}")
        ids.append(pid)
        for s in range(1 + i % 2):
            sid = f"{pid}-{'PB' if s == 0 else 'BM'}"
            x = rng.normal(size=(int(rng.integers(10, 20)), 6)).astype(np.float32)
            if label == "disease":
                x[:3, 0] += 3.0
            slides.append(f"{sid},{pid},src,{'PB' if s == 0 else 'BM'}")
            ids.append(sid)
            write_bag(bags / f"{sid}.h5", x, slide_id=sid, patient_id=pid, backbone="test/planted")
    (cohort / "patients.csv").write_text("\n".join(patients) + "\n")
    (cohort / "slides.csv").write_text("\n".join(slides) + "\n")
    return cohort, bags, ids


def _config(tmp: Path, *extra: str) -> dict[str, Any]:
    return load_config(None, ["data.classes=[healthy, disease]", "data.patient_features=[wbc, hb]",
                              "data.log_features=[wbc]", "train.epochs=3", "train.batch_size=4", "cv.folds=2",
                              f"tracking.salt_file={tmp / 'secret' / 'salt'}", *extra])


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline ``run-*.wandb`` file (a LevelDB-style log after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            return
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def read_run(run_folder: Path) -> dict[str, Any]:
    """History rows, summary, config and artifact types of the one offline W&B run of a milhema run folder."""
    (wandb_dir,) = offline_runs(run_folder)
    (path,) = wandb_dir.glob("run-*.wandb")
    # wandb 0.31's run.finish() returns before its wandb-core process has flushed the file (it
    # writes through an open descriptor, so the renamed run folder still gets everything): wait
    # for the run's exit record.
    deadline = time.monotonic() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        assert time.monotonic() < deadline, f"{path} never got its exit record"
        time.sleep(0.2)
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "artifacts": [], "dir": wandb_dir}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in record.summary.update})
        elif kind in ("run", "config"):  # the config given to wandb.init travels in the run record
            items = record.run.config.update if kind == "run" else record.config.update
            out["config"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items})
        elif kind == "artifact":
            out["artifacts"].append(record.artifact.type)
    return out


def raw_hits(folder: Path, identifiers: list[str]) -> list[str]:
    """``file: id`` for every identifier found in the bytes of any file under ``folder``."""
    hits = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {i}" for i in identifiers if i.encode() in data]
    return hits


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    return identified_cohort(tmp_path_factory.mktemp("identified"), "MRN")


@pytest.fixture(scope="module")
def tracked_cv(cohort, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    tmp = tmp_path_factory.mktemp("tracked")
    config = _config(tmp, "tracking.log_checkpoint=true", "tracking.tags=[test]")
    loaded = load_cohort(cohort[0], CLASSES, ["wbc", "hb"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)  # a tracking failure here is a test failure
        metrics = run_cv(config, loaded, cohort[1], tmp / "cv", progress=False)
    return tmp / "cv", metrics, config


def test_cv_run_holds_history_summary_plots_and_checkpoint(tracked_cv) -> None:
    out, metrics, config = tracked_cv
    run = read_run(out)
    assert not list(out.parent.glob(".*partial"))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert {(h["repeat"], h["fold"]) for h in history} == {(0, 0), (0, 1)}
    for line in history:  # every local per-epoch number is in W&B, identical
        prefix = f"r{line['repeat']}_f{line['fold']}"
        rows = [row for row in run["history"] if row.get(f"{prefix}/epoch") == line["epoch"]]
        assert len(rows) == 1
        for key in ("train_loss", "val_loss", "val_balanced_accuracy", "lr"):
            assert rows[0][f"{prefix}/{key}"] == line[key]
    summary = run["summary"]
    bacc = metrics["patient"]["balanced_accuracy"]
    assert summary["patient/balanced_accuracy"] == bacc["mean"]
    assert [summary["patient/balanced_accuracy_ci_low"], summary["patient/balanced_accuracy_ci_high"]] == bacc["ci95"]
    base = metrics["baselines"]["cbc_only"]["patient"]["macro_auroc"]
    assert summary["baselines/cbc_only/patient/macro_auroc"] == base["mean"]
    assert summary["n_patients"] == 8 and summary["folds"] == 2
    assert run["config"]["train"]["epochs"] == 3 and run["config"]["tracking"]["mode"] == "offline"
    tables = {p.name.split("_table")[0] for p in (run["dir"] / "files" / "media" / "table").rglob("*.table.json")}
    assert {"confusion_matrix", "roc"} <= tables
    assert "model" in run["artifacts"]  # tracking.log_checkpoint: true


def test_no_raw_identifier_reaches_wandb(tracked_cv, cohort) -> None:
    out, _, config = tracked_cv
    ids = cohort[2]
    run = read_run(out)  # waits until W&B has written everything
    assert raw_hits(out / "wandb", ids) == []
    staging = Path(os.environ["WANDB_DATA_DIR"])  # tables and artifact files wait here for `wandb sync`
    assert raw_hits(staging, ids) == []
    salt_file = Path(config.tracking.salt_file)
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    assert raw_hits(out / "wandb", [salt_file.read_text().strip()]) == []
    # the predictions table holds the pseudonyms of exactly the cohort's patients
    pseudonym = Pseudonymizer(load_or_create_salt(salt_file))
    (table,) = (run["dir"] / "files" / "media" / "table").glob("predictions_*.table.json")
    logged = {row[0] for row in json.loads(table.read_text())["data"]}
    assert logged == {pseudonym(p) for p in ids if "-" not in p}


def test_cv_needs_no_network_and_no_identifier_reaches_its_output(cohort, tmp_path: Path, no_network: list[str],
                                                                  capsys, caplog) -> None:
    """``milhema cv`` with offline tracking and every outside connection blocked: it completes, W&B
    works, and no raw patient or slide id is in what it printed or logged, its history or its W&B files."""
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(_config(tmp_path)))
    out = tmp_path / "cv"
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)  # tracking must work without the network
        code = main(["cv", "--config", str(config), "--cohort", str(cohort[0]), "--bags", str(cohort[1]),
                     "--out", str(out), "-q"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert no_network == []  # nothing even tried to connect or look a name up
    assert read_run(out)["summary"]["n_patients"] == 8  # waits until W&B has written everything
    ids = cohort[2]
    said = printed.out + printed.err + "\n".join(record.getMessage() for record in caplog.records)
    assert [i for i in ids if i in said] == []
    assert raw_hits(out / "wandb", ids) == []
    assert [i for i in ids if i in (out / "history.jsonl").read_text()] == []


def test_offline_run_can_be_synced_after_the_rename(tracked_cv) -> None:
    out, _, _ = tracked_cv
    (run_dir,) = offline_runs(out)
    assert (out / "wandb" / "latest-run").resolve() == run_dir.resolve()
    wandb_cli = Path(sys.executable).parent / "wandb"
    result = subprocess.run([str(wandb_cli), "sync", "--dry-run", str(run_dir)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Would sync 1 run" in result.stdout + result.stderr


def test_pseudonymize_false_logs_raw_ids(tmp_path: Path) -> None:
    """The positive control of the privacy test: the same search finds ids when they are logged."""
    cohort_dir, bags, ids = identified_cohort(tmp_path, "XRN")
    config = _config(tmp_path, "tracking.pseudonymize=false")
    run_train(config, load_cohort(cohort_dir, CLASSES, ["wbc", "hb"]), bags, tmp_path / "run", progress=False)
    assert raw_hits(tmp_path / "run" / "wandb", ids)


def test_disabled_writes_no_wandb_folder_and_needs_no_wandb(cohort, tmp_path: Path, monkeypatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` would fail
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        code = main(["train", "--cohort", str(cohort[0]), "--bags", str(cohort[1]), "--out", str(tmp_path / "run"),
                     "-q", "--set", "data.classes=[healthy, disease]", "data.patient_features=[wbc, hb]",
                     "data.log_features=[wbc]", "train.epochs=2", "--set", "tracking.mode=disabled"])
    assert code == 0
    assert "W&B" not in capsys.readouterr().out
    assert not (tmp_path / "run" / "wandb").exists()
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 2


def test_broken_tracking_warns_and_training_completes(cohort, tmp_path: Path) -> None:
    config = _config(tmp_path, "tracking.project=no/slashes/allowed")  # wandb.init refuses the name
    with pytest.warns(TrackingWarning, match="starting the run.*Invalid project name"):
        metrics = run_train(config, load_cohort(cohort[0], CLASSES, ["wbc", "hb"]), cohort[1], tmp_path / "run",
                            progress=False)
    assert metrics["epochs_run"] == 3
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "history.jsonl").is_file()


def test_setup_failures_become_warnings(tmp_path: Path, monkeypatch) -> None:
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (tmp_path / "a_file").write_text("")
    inside = _config(tmp_path, f"tracking.salt_file={run_folder / 'salt'}")
    with pytest.warns(TrackingWarning, match="inside the run folder"):
        assert not start_tracker(inside, run_folder, name="run", job_type="cv").active
    unwritable = _config(tmp_path, f"tracking.salt_file={tmp_path / 'a_file' / 'salt'}")
    with pytest.warns(TrackingWarning, match="cannot create it"):
        assert not start_tracker(unwritable, run_folder, name="run", job_type="cv").active
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.warns(TrackingWarning, match="ModuleNotFoundError"):
        tracker = start_tracker(_config(tmp_path), run_folder, name="run", job_type="cv")
    tracker.log_epoch({"epoch": 1, "train_loss": 0.5})  # inactive: nothing happens, nothing raised
    tracker.finish()
    assert not (run_folder / "wandb").exists()


def test_failure_during_the_run_warns_once_and_stops_tracking(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    tracker = start_tracker(_config(tmp_path), tmp_path / "run", name="run", job_type="train")
    assert tracker.active
    tracker._run.finish()  # the run dies under the tracker (as after a lost connection)
    with pytest.warns(TrackingWarning, match="logging an epoch") as caught:
        tracker.log_epoch({"epoch": 1, "train_loss": 0.5})
        tracker.log_summary({"n_patients": 3})
        tracker.finish()
    assert len(caught) == 1 and not tracker.active


def test_images_are_logged_only_when_asked(tmp_path: Path) -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    for flag in (False, True):
        folder = tmp_path / str(flag)
        folder.mkdir()
        tracker = start_tracker(_config(tmp_path, f"tracking.log_images={str(flag).lower()}"), folder,
                                name="run", job_type="train")
        assert tracker.log_image("cells/gallery", image) is flag
        tracker.finish()
        assert bool(list(folder.glob("wandb/offline-run-*/files/media/images/**/*.png"))) is flag


def test_pseudonyms_are_keyed_stable_and_salt_is_private(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "salt"
    salt = load_or_create_salt(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(salt) == 32
    assert load_or_create_salt(path) == salt
    p = Pseudonymizer(salt)
    assert p("P001") == p("P001") != p("P002")
    assert p("P001").startswith("p_") and p("P001", "slide").startswith("s_") and "P001" not in p("P001")
    assert Pseudonymizer(load_or_create_salt(tmp_path / "other"))("P001") != p("P001")
    assert Pseudonymizer(None)("P001") == "P001"
    (tmp_path / "bad").write_text("not hex\n")
    with pytest.raises(TrackingError, match="expected hex text"):
        load_or_create_salt(tmp_path / "bad")
    env = {"MILHEMA_SALT_FILE": "/x/salt", "XDG_CONFIG_HOME": "/cfg"}
    assert salt_path("/given", env) == Path("/given") and salt_path(None, env) == Path("/x/salt")
    assert salt_path(None, {"XDG_CONFIG_HOME": "/cfg"}) == Path("/cfg/milhema/salt")


def test_environment_only_makes_tracking_more_private() -> None:
    assert effective_mode("online", {}) == "online"
    assert effective_mode("online", {"WANDB_MODE": "offline"}) == "offline"
    assert effective_mode("offline", {"WANDB_MODE": "online"}) == "offline"
    assert effective_mode("offline", {"WANDB_MODE": "disabled"}) == "disabled"
    assert effective_mode("online", {"WANDB_DISABLED": "true"}) == "disabled"


def test_flatten_metrics() -> None:
    flat = flatten_metrics({"patient": {"macro_f1": {"mean": 0.8, "std": 0.1, "ci95": [0.6, 0.9]},
                                        "confusion_matrix": [[1, 0], [0, 1]],
                                        "per_class": {"AML": {"auroc": 0.9, "f1": None}}},
                            "classes": ["AML", "MDS"], "folds": 5, "model": "abmil"})
    assert flat == {"patient/macro_f1": 0.8, "patient/macro_f1_std": 0.1, "patient/macro_f1_ci_low": 0.6,
                    "patient/macro_f1_ci_high": 0.9, "patient/per_class/AML/auroc": 0.9, "folds": 5,
                    "model": "abmil"}


@pytest.mark.parametrize("override, message", [
    ("tracking.salt_file=3", "tracking.salt_file must be null or a non-empty string"),
    ("tracking.tags=[ok, 7]", "tracking.tags must be a list of non-empty strings"),
    ("tracking.log_checkpoint=yes please", "true or false"),
    ("tracking.project=''", "tracking.project must be a name"),
])
def test_tracking_config_validation(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_sweep_runs_valid_milhema_commands(tmp_path: Path) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from milhema.models.fusion import FUSION_MODES
    from milhema.models.registry import list_models

    sweep = yaml.safe_load((REPO / "configs" / "sweep.yaml").read_text())
    assert sweep["program"] == "milhema" and sweep["metric"]["name"] == "patient/balanced_accuracy"
    params = sweep["parameters"]
    assert set(params) == {"model.name", "fusion.mode", "train.lr"}
    assert set(params["model.name"]["values"]) <= set(list_models())
    assert set(params["fusion.mode"]["values"]) <= set(FUSION_MODES)
    for key, spec in params.items():
        section, name = key.split(".")
        assert name in DEFAULTS[section]
        for value in spec.get("values", [spec.get("min"), spec.get("max")]):
            load_config(None, [f"{key}={value}"])
    # Expand the command as `wandb agent` does, with a stand-in `milhema` that prints its arguments.
    sampled = {key: {"value": spec["values"][-1] if "values" in spec else spec["min"]} for key, spec in params.items()}
    macros = create_sweep_command_args({"args": sampled})
    macros.update(env=[], program=["milhema"])
    command = [part for c in sweep["command"]
               for part in (macros[c[2:-1]] if c.startswith("${") else [c])]
    assert command[:2] == ["sh", "-c"]
    script = "milhema() { printf '%s\\n' \"$@\"; }; " + command[2]
    printed = subprocess.run(["sh", "-c", script, *command[3:]], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "WANDB_RUN_ID": "abc123"}, check=True).stdout.splitlines()
    args = build_parser().parse_args(printed)
    assert args.command == "cv" and args.out == Path("runs/sweep/abc123")
    config = load_config(REPO / args.config, args.set)
    assert (config.model.name, config.fusion.mode) == ("graph", "bilinear")
    assert config.train.lr == pytest.approx(2e-4) and config.tracking.mode == "online"
