"""Security: hostile weight, checkpoint and config files run nothing, and nothing needs the network.

Each hostile file carries a real payload (it creates a marker file when unpickled or loaded as
unsafe YAML); a positive control proves the payload fires under an unsafe loader, and the test
then shows milhema refuses the file cleanly (exit status 2, one line) without firing it.
"""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EMBED_ARGS, one_thread

from milhema.bags import read_bag, validate_bag
from milhema.cli import main
from milhema.config import load_config
from milhema.data import load_cohort
from milhema.errors import MilhemaError
from milhema.train.checkpoint import load_checkpoint
from milhema.train.run import run_train


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _hostile(path: Path, marker: Path, kind: str) -> Path:
    """A weights/checkpoint file whose tensors are a payload: ``torch`` (torch.save's zip) or ``pickle``."""
    state = {"state_dict": {"conv1.weight": _Payload(marker)}}
    if kind == "torch":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path


def _fires(path: Path, marker: Path) -> bool:
    """Positive control: an unsafe load of ``path`` does run the payload (then the marker is removed)."""
    loaders = (lambda: torch.load(path, map_location="cpu", weights_only=False),
               lambda: pickle.loads(path.read_bytes()))  # torch.load reads *.safetensors another way
    for load in loaders:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load()
        except Exception:  # the payload returns an int where a tensor was expected; it has already run
            pass
        if marker.exists():
            break
    fired = marker.exists()
    marker.unlink(missing_ok=True)
    return fired


def _refused(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run the CLI; assert exit status 2 with one line and no traceback; return that line."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


HOSTILE = [("evil.pt", "torch"), ("evil.bin", "torch"), ("evil.pth", "pickle"), ("evil.pth", "torch"),
           ("evil.safetensors", "pickle")]


@pytest.mark.parametrize(("name", "kind"), HOSTILE)
def test_hostile_weights_for_embed_are_refused_and_never_run(name: str, kind: str, tiny_cohort: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    weights = _hostile(tmp_path / name, marker, kind)
    assert _fires(weights, marker)
    out = tmp_path / "bags"
    err = _refused(capsys, ["embed", "--cohort", str(tiny_cohort), "--out", str(out), "--weights", str(weights),
                            "--input-size", "64", "--workers", "0", "-q"])
    assert f"weights {name}: " in err
    assert "refused" in err if name != "evil.safetensors" else "not a readable safetensors file" in err
    assert "weights_only" not in err  # torch's advice to load unsafely is not passed on
    assert not marker.exists() and not list(out.glob("*.h5"))


@pytest.fixture(scope="module")
def train_run(tiny_cohort: Path, tiny_bags: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(None, ["train.epochs=2", "tracking.mode=disabled"])
    out = tmp_path_factory.mktemp("security") / "run"
    run_train(config, load_cohort(tiny_cohort, config.data.classes, config.data.patient_features),
              tiny_bags, out, progress=False)
    return out


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_hostile_checkpoints_are_refused_and_never_run(command: str, train_run: Path, tiny_cohort: Path,
                                                       tiny_bags: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    run = tmp_path / "run"
    shutil.copytree(train_run, run)
    args = [command, "--run", str(run), "--cohort", str(tiny_cohort), "--bags", str(tiny_bags), "-q"]
    # A pickle where the safetensors weights belong.
    weights = _hostile(run / "checkpoints" / "model.safetensors", marker, "pickle")
    assert _fires(weights, marker)
    err = _refused(capsys, [*args, "--out", str(tmp_path / "out1")])
    assert "checkpoint model: cannot read it" in err and not marker.exists()
    with pytest.raises(MilhemaError):
        load_checkpoint(run / "checkpoints" / "model")
    # PyTorch checkpoints beside the JSON are never a fallback.
    weights.unlink()
    for suffix in (".pt", ".pth", ".bin"):
        _hostile(run / "checkpoints" / f"model{suffix}", marker, "torch")
    err = _refused(capsys, [*args, "--out", str(tmp_path / "out2")])
    assert "model.json and model.safetensors are both needed" in err
    assert not marker.exists() and not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_yaml_python_tags_are_refused_and_never_run(train_run: Path, tiny_cohort: Path, tiny_bags: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    tag = f"!!python/object/apply:os.system [{shlex.quote(f'touch {marker}')}]"
    hostile = f"train:\n  epochs: {tag}\n"
    yaml.unsafe_load(hostile)  # positive control: an unsafe YAML loader runs the command
    assert marker.exists()
    marker.unlink()
    config = tmp_path / "hostile.yaml"
    config.write_text(hostile)
    train = ["train", "--cohort", str(tiny_cohort), "--bags", str(tiny_bags), "--out", str(tmp_path / "run"), "-q"]
    err = _refused(capsys, [*train, "--config", str(config)])
    assert f"config {config}: not valid YAML" in err
    err = _refused(capsys, [*train, "--set", f"train.epochs={tag}"])
    assert "--set" in err and "not valid YAML" in err
    # The config.yaml of a run folder is read the same way.
    run = tmp_path / "hostile_run"
    shutil.copytree(train_run, run)
    (run / "config.yaml").write_text(hostile)
    err = _refused(capsys, ["predict", "--run", str(run), "--cohort", str(tiny_cohort), "--bags", str(tiny_bags),
                            "--out", str(tmp_path / "pred")])
    assert "cannot be read as the run's config" in err
    assert not marker.exists() and not (tmp_path / "run").exists() and not (tmp_path / "pred").exists()


def test_embed_needs_no_network_and_prints_no_identifier(no_network: list[str], tiny_cohort: Path, tiny_bags: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bags"
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        assert main(["embed", "--cohort", str(tiny_cohort), "--out", str(out), *EMBED_ARGS]) == 0
    assert no_network == []  # nothing even tried to connect
    printed = capsys.readouterr()
    cohort = load_cohort(tiny_cohort, load_config().data.classes)
    for slide in cohort.slides:
        assert validate_bag(out / f"{slide.slide_id}.h5")["n_cells"] == read_bag(tiny_bags / f"{slide.slide_id}.h5").n_cells
    identifiers = [*cohort.patient_ids, *(s.slide_id for s in cohort.slides)]
    assert [i for i in identifiers if i in printed.out + printed.err] == []


def test_the_network_guard_does_block(no_network: list[str]) -> None:
    """Positive control of :func:`no_network`: a real outside connection is stopped and recorded."""
    import socket
    import urllib.request

    with pytest.raises(OSError, match="network access blocked by the test"):
        urllib.request.urlopen("http://example.org", timeout=5)
    with pytest.raises(OSError, match="network access blocked by the test"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    assert len(no_network) == 2
