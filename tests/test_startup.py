"""Start-up of `milhema train` (issue 19): heavy libraries only some runs need are imported on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from milhema.bags import open_bag, read_bag, read_bag_attrs, read_open_bag, write_bag
from milhema.train.calibration import calibration_figure, coverage_curve

# A fresh interpreter loads what `milhema train` loads before its first epoch, checks that
# torch-geometric and matplotlib stayed out, then builds and runs the graph model (which needs
# torch-geometric) and says whether it was loaded then.
_PROBE = """
import sys
import torch
import milhema.config, milhema.train.run
print(sorted(m for m in ("torch_geometric", "matplotlib") if m in sys.modules))
from milhema.models import create_model
model = create_model("graph", in_dim=6, n_classes=3, hidden_dim=8, k=2)
out = model(torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
print(tuple(out.logits.shape), round(float(out.cell_scores.sum()), 4), "torch_geometric" in sys.modules)
"""


def test_train_start_up_leaves_out_graph_and_plot_libraries_until_used() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "(2, 3) 2.0 True"   # two bags, three classes, scores sum to one per bag


def test_calibration_figure_imports_matplotlib_itself(tmp_path: Path) -> None:
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    calibration_figure(y, probs, probs, coverage_curve(y, probs, 2), tmp_path / "calibration.png")
    assert (tmp_path / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bag_checked_once_reads_the_same(tmp_path: Path) -> None:
    """Training checks each bag's structure while inspecting the bags and skips that check when
    reading it again; what is read is the same."""
    rng = np.random.default_rng(0)
    path = write_bag(tmp_path / "S1.h5", rng.normal(size=(6, 4)).astype(np.float32), slide_id="S1", patient_id="P1")
    read_bag_attrs(path)   # inspect_bags' check
    with open_bag(path) as f:
        again = read_open_bag(f, path, thumbnails=False, checked=True)
    whole = read_bag(path)
    np.testing.assert_array_equal(again.features, whole.features)
    assert list(again.cell_ids) == list(whole.cell_ids)
    assert again.attrs.keys() == whole.attrs.keys() and again.attrs["slide_id"] == "S1"   # (mpp is NaN: unknown)
