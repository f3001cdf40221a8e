"""Shared fixtures. Tests make their own small data; nothing is downloaded."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# Tests write real offline W&B runs into temporary folders and never send anything.
os.environ["WANDB_MODE"] = "offline"


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n N`` (pytest-xdist) each worker computes on one thread: N workers share the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_tracking_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the pseudonymisation salt and W&B's own settings, cache and staging out of the home folder."""
    root = tmp_path_factory.mktemp("tracking")
    os.environ["MILHEMA_SALT_FILE"] = str(root / "salt")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ[name] = str(root / name.lower())
    return root


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated cohort of 8 patients (2 per class) with ~16 small crops per slide."""
    from milhema.synth import synthesize_cohort

    out = tmp_path_factory.mktemp("cohort") / "tiny"
    return synthesize_cohort(out, n_patients=8, seed=11, cells_per_slide=16, crop_px=64, workers=1, progress=False)


EMBED_ARGS = ("--backbone", "timm/resnet18", "--no-pretrained", "--input-size", "64", "--batch-size", "1",
              "--workers", "0", "-q")
"""``milhema embed`` options of :func:`tiny_bags`: one cell per batch, so features never depend on
which other cells share a batch (a resumed embed batches differently) and match bit for bit."""


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, as the test's subprocesses do (``OMP_NUM_THREADS=1``): results are then
    bit-identical between this process and theirs, and the shared test machine is not oversubscribed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bags(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bags of :func:`tiny_cohort` (random resnet18 features, 64 px input), made as ``EMBED_ARGS`` make them."""
    from milhema.cli import main

    out = tmp_path_factory.mktemp("tiny_bags") / "bags"
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        assert main(["embed", "--cohort", str(tiny_cohort), "--out", str(out), *EMBED_ARGS]) == 0
    return out


def _is_local(host: object) -> bool:
    return str(host) in ("localhost", "::1", "") or str(host).startswith("127.")


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse every connection and name lookup that leaves the machine; returns the attempts made.

    Loopback stays open: W&B's client talks to its own local service process over it, even offline.
    """
    attempts: list[str] = []

    def refuse(address: object) -> None:
        attempts.append(repr(address))
        raise OSError(f"network access blocked by the test: {address!r}")

    def guard(real: Any) -> Any:
        def connect(sock: socket.socket, address: Any) -> Any:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
                refuse(address)
            return real(sock, address)
        return connect

    real_create, real_lookup = socket.create_connection, socket.getaddrinfo

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        if not _is_local(address[0]):
            refuse(address)
        return real_create(address, *args, **kwargs)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_local(host):
            refuse(host)
        return real_lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guard(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts
