from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from milhema.cli import main
from milhema.demo import DemoSettings, run_demo


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "milhema", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_bad_input_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    (tmp_path / "patients.csv").write_text("patient_id,label\nP1,AMl\n")
    (tmp_path / "slides.csv").write_text("slide_id,patient_id,source\nS1,P1,.\n")
    result = _run("embed", "--cohort", str(tmp_path), "--out", str(tmp_path / "bags"), "--no-pretrained")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "milhema: error: patients.csv row 2: label 'AMl' is not one of AML, MDS, VEXAS, reactive (did you mean 'AML'?)"]
    assert "Traceback" not in result.stderr and not (tmp_path / "bags").exists()
    debug = _run("embed", "--cohort", str(tmp_path), "--out", str(tmp_path / "bags"), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_config_errors_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["embed", "--cohort", str(tmp_path), "--out", str(tmp_path / "b"), "--set", "data.clases=[a,b]"])
    assert code == 2
    assert "unknown key 'data.clases' (did you mean 'data.classes'?)" in capsys.readouterr().err


def test_synth_cli_and_help(tmp_path: Path) -> None:
    result = _run("synth", "--out", str(tmp_path / "c"), "--patients", "4", "--cells", "3", "--crop-px", "48", "-q")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c" / "patients.csv").read_text().count("\n") == 5
    assert json.loads((tmp_path / "c" / "synth.json").read_text())["seed"] == 0
    again = _run("synth", "--out", str(tmp_path / "c"), "--patients", "4")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "embed" in _run("--help").stdout


def test_demo_end_to_end_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = DemoSettings(patients=12, seed=5, cells_per_slide=10, input_size=48, folds=3, epochs=3)
    results = run_demo(tmp_path / "demo", settings, progress=False)
    printed = capsys.readouterr().out
    assert "CBC only" in printed and "abmil + CBC (concat)" in printed and "balanced acc." in printed
    assert (tmp_path / "demo" / "run" / "metrics.json").is_file()
    (sync,) = [line for line in printed.splitlines() if line.startswith("W&B offline run: wandb sync ")]
    assert list(Path(sync.split()[-1]).glob("run-*.wandb"))  # the path printed is the run W&B can sync
    for metrics in results.values():
        assert 0.0 <= metrics["balanced_accuracy"]["mean"] <= 1.0
        lo, hi = metrics["macro_auroc"]["ci95"]
        assert lo <= metrics["macro_auroc"]["mean"] <= hi
        assert sum(map(sum, metrics["confusion_matrix"])) == 12
    assert json.loads((tmp_path / "demo" / "demo_metrics.json").read_text()).keys() == results.keys()
    (report_line,) = [line for line in printed.splitlines() if line.strip().startswith("open ")]
    report = Path(report_line.split()[1])
    assert report.is_file() and report.name == "report.html" and "<img" in report.read_text()
    # Re-run after an upgrade that changed how bags are made: the demo redoes its own bags.
    bag = next((tmp_path / "demo" / "bags").glob("*.h5"))
    with h5py.File(bag, "r+") as fh:
        made = fh.attrs["embed_signature"]
        fh.attrs["embed_signature"] = str(made).replace('"morphology": ', '"morphology": -')
    rerun = run_demo(tmp_path / "demo", settings, progress=False)  # reuses the cohort
    printed = capsys.readouterr().out
    assert "reusing" in printed and "bags made with other settings" in printed
    with h5py.File(bag, "r") as fh:
        assert fh.attrs["embed_signature"] == made
    assert rerun["CBC only"]["balanced_accuracy"] == results["CBC only"]["balanced_accuracy"]
