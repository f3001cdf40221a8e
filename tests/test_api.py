"""The notebook API: the README's example runs as written, and agrees with ``milhema predict``."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import milhema
from milhema.cli import main
from milhema.errors import MilhemaError

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ``demo_out/`` laid out as ``milhema demo`` lays it out: cohort, bags, a cv run."""
    from milhema.synth import synthesize_cohort

    root = tmp_path_factory.mktemp("api")
    out = root / "demo_out"
    synthesize_cohort(out / "cohort", n_patients=8, seed=3, cells_per_slide=12, crop_px=48, workers=1,
                      progress=False)
    assert main(["embed", "--cohort", str(out / "cohort"), "--out", str(out / "bags"), "--backbone", "none",
                 "--morphology", "-q"]) == 0
    assert main(["cv", "--cohort", str(out / "cohort"), "--bags", str(out / "bags"), "--out", str(out / "run"),
                 "--folds", "2", "-q", "--set", "train.epochs=4", "tracking.mode=disabled"]) == 0
    return root


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(demo_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo_out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_readme_example(), "README.md", "exec"), {})  # noqa: S102  (our own README)
    lines = printed.getvalue().splitlines()
    assert re.match(r"(AML|MDS|VEXAS|reactive) \{'AML': 0\.\d+", lines[0])
    assert "cell_id" in lines[1] and "score" in lines[1] and "rank_pct" in lines[1]
    assert (demo_out / "P0003_gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_bags_equals_milhema_predict_ensemble(demo_out: Path, tmp_path: Path) -> None:
    out = demo_out / "demo_out"
    assert main(["predict", "--run", str(out / "run"), "--cohort", str(out / "cohort"), "--bags", str(out / "bags"),
                 "--out", str(tmp_path / "pred"), "--ensemble", "-q"]) == 0
    with (tmp_path / "pred" / "predictions.csv").open(newline="") as fh:
        expected = {r["patient_id"]: r for r in csv.DictReader(fh)}
    with (out / "cohort" / "patients.csv").open(newline="") as fh:
        patients = {r["patient_id"]: r for r in csv.DictReader(fh)}
    run = milhema.load_run(out / "run", device="cpu")
    assert run.classes == ["AML", "MDS", "VEXAS", "reactive"] and len(run.models) == 2
    for pid in ("P0001", "P0006"):
        cbc = {c: float(patients[pid][c]) for c in run.patient_features if patients[pid][c]}
        result = run.predict_bags(sorted((out / "bags").glob(f"{pid}_*.h5")), cbc=cbc, patient_id=pid)
        for name, p in result.probabilities.items():
            assert math.isclose(p, float(expected[pid][f"prob_{name}"]), abs_tol=2e-6), (pid, name)
        cells = result.cells
        assert len(cells) == result.bag.n_cells and math.isclose(cells["score"].sum(), 1.0, rel_tol=1e-5)
        assert cells["cell_type"].str.len().gt(0).all()   # simulated crops carry their type
        assert list(cells["cell_id"][:2]) == list(result.bag.cell_ids[:2])
    # CBC only: a patient without bags is predicted from its features alone, and says what it reads.
    alone = run.predict_bags([], cbc={"wbc": 60.0, "hb": 7.0})
    assert alone.bag.n_cells == 0 and math.isclose(sum(alone.probabilities.values()), 1.0, rel_tol=1e-6)
    with pytest.raises(MilhemaError, match="cbc names ferritin, which the run's models do not read"):
        run.predict_bag(next((out / "bags").glob("*.h5")), cbc={"ferritin": 300.0})


def test_load_run_is_lazy_and_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    code = "import sys, milhema; print('torch' in sys.modules)"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert printed == "False"   # `import milhema` stays light; load_run pulls torch in when used
    with pytest.raises(MilhemaError, match="is not a milhema run folder"):
        milhema.load_run(tmp_path)
