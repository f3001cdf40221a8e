"""Training speed: milhema's padded, length-bucketed batches against one bag per optimiser step
(the CLAM / TransMIL / Patch-GCN convention), same model, same bags, same code path
(``milhema.train.loop.fit`` with ``batch_size`` 1 versus 16). Prints a table and, with
--record, appends it to docs/PERFORMANCE.md.

    python tools/bench_train.py [--patients 64] [--cells 500] [--dim 512] [--epochs 3] [--device cpu] [--record]

Bags are synthetic (Gaussian features, 0.5–1.5 × --cells cells each) and held in memory, so
the table measures training compute, not disk. Both arms train on whole bags (no subsampling);
a third row shows milhema's default of 128 cells sampled per bag and step.
If ``torchmil`` is importable, its ABMIL trained one bag per step is timed as well.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import numpy as np
import torch
from perf_record import record  # tools/ is on sys.path when a tool runs as a script

from milhema.config import load_config
from milhema.device import resolve_device
from milhema.train.data import PatientBag
from milhema.train.loop import fit
from milhema.train.model import build_model, model_spec


def make_bags(n: int, cells: int, dim: int, seed: int = 0) -> list[PatientBag]:
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        m = int(cells * rng.uniform(0.5, 1.5))
        label = i % 4
        x = rng.normal(size=(m, dim)).astype(np.float16)
        x[: m // 10, label] += 2.0   # a few informative cells, so the loss has something to learn
        bags.append(PatientBag(f"P{i}", label, x, np.zeros(m, np.int64), np.zeros(m, np.int64),
                               np.full((m, 2), np.nan, np.float32), np.array([str(j) for j in range(m)], object),
                               [f"P{i}_S0"], np.zeros(0, np.float32)))
    return bags


def time_fit(bags: list[PatientBag], model_name: str, batch_size: int, epochs: int, max_cells: int,
             device: torch.device) -> float:
    """Seconds per epoch of ``fit`` (first epoch excluded as warm-up)."""
    config = load_config(None, [f"model.name={model_name}", "fusion.mode=none", f"train.batch_size={batch_size}",
                                f"train.epochs={epochs + 1}", f"train.patience={epochs + 2}",
                                f"data.max_cells={max_cells}", "data.classes=[a, b, c, d]", "data.cbc_columns=[]",
                                "data.cbc_log_columns=[]", "tracking.mode=disabled", f"train.device={device}"])
    spec = model_spec(config, bags[0].features.shape[1], ["a", "b", "c", "d"], [], [])
    model = build_model(spec)
    model.feature_norm.fit(b.features for b in bags)
    stamps: list[float] = []
    fit(model, bags, [], config, device=device, log=lambda _: stamps.append(time.perf_counter()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def time_torchmil(bags: list[PatientBag], epochs: int, device: torch.device,
                  batch_size: int) -> float | None:
    """Seconds per epoch of torchmil's ABMIL (binary, its own loss), one bag per step or padded batches."""
    try:
        from torchmil.models import ABMIL
    except ImportError:
        return None
    torch.manual_seed(0)
    model = ABMIL(in_shape=(bags[0].features.shape[1],), gated=True).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = []
    for start in range(0, len(bags), batch_size):
        group = bags[start:start + batch_size]
        width = max(b.n_cells for b in group)
        x = torch.zeros(len(group), width, group[0].features.shape[1])
        mask = torch.zeros(len(group), width)
        for i, b in enumerate(group):
            x[i, :b.n_cells] = torch.from_numpy(b.features.astype(np.float32))
            mask[i, :b.n_cells] = 1
        y = torch.tensor([float(b.label > 1) for b in group])
        batches.append((x.to(device), mask.to(device), y.to(device)))
    times = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        for x, mask, y in batches:
            _, losses = model.compute_loss(y, x, mask)
            total = sum(losses.values())
            optimiser.zero_grad()
            total.backward()
            optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.mean(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", default="abmil,transmil,graph")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    bags = make_bags(args.patients, args.cells, args.dim)
    n_cells = sum(b.n_cells for b in bags)
    whole = 10 * args.cells   # larger than any bag: no subsampling
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"## Training speed ({name}, torch {torch.__version__}, {datetime.date.today().isoformat()})", "",
             f"`python tools/bench_train.py --patients {args.patients} --cells {args.cells} --dim {args.dim} "
             f"--epochs {args.epochs} --device {args.device}`: {args.patients} bags, {n_cells:,} cells, "
             f"{args.dim}-d features; seconds per epoch (mean of {args.epochs} after a warm-up epoch).", "",
             "| model | one bag per step | milhema batches of 16 | speed-up | batches of 16, 128 cells sampled | speed-up |",
             "|---|---|---|---|---|---|"]
    for model_name in args.models.split(","):
        single = time_fit(bags, model_name, 1, args.epochs, whole, device)
        batched = time_fit(bags, model_name, 16, args.epochs, whole, device)
        sampled = time_fit(bags, model_name, 16, args.epochs, 128, device)
        lines.append(f"| {model_name} | {single:.2f} s | {batched:.2f} s | {single / batched:.1f}× | "
                     f"{sampled:.2f} s | {single / sampled:.1f}× |")
        print(lines[-1], flush=True)
    lines.append("")
    single = time_torchmil(bags, args.epochs, device, 1)
    if single is None:
        lines.append("torchmil is not installed in this environment; not compared.")
    else:
        batched = time_torchmil(bags, args.epochs, device, 16)
        lines.append(f"torchmil ABMIL (gated, binary loss, features fed directly to the attention): "
                     f"{single:.2f} s per epoch one bag per step, {batched:.2f} s in padded batches of 16.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        record(text + f"\nMachine: {platform.machine()}, {platform.system()}.\n")


if __name__ == "__main__":
    main()
