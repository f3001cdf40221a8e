"""Training speed: milhema's padded, length-bucketed batches against one bag per optimiser step
(the CLAM / TransMIL / Patch-GCN convention), same model, same bags, same code path
(``milhema.train.loop.fit`` with ``batch_size`` 1 versus 16). Prints a table and, with
--record, appends it to docs/PERFORMANCE.md.

    python tools/bench_train.py [--patients 64] [--cells 500] [--dim 512] [--epochs 3] [--device cpu] [--record]

Bags are synthetic (Gaussian features, 0.5–1.5 × --cells cells each; two classes, 10 % of a
positive bag's cells shifted) and held in memory, so the table measures training compute, not
disk. Both arms train on whole bags (no subsampling); a third column shows milhema's default of
128 cells sampled per bag and step. Every arm's model is then scored on as many held-out bags
(balanced accuracy), so speed is compared at known accuracy.
If ``torchmil`` is importable, its ABMIL trained one bag per step and in padded batches is timed
and scored as well.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from importlib.metadata import version

import numpy as np
import torch
from perf_record import record  # tools/ is on sys.path when a tool runs as a script
from sklearn.metrics import balanced_accuracy_score

from milhema.config import load_config
from milhema.device import resolve_device
from milhema.train.data import PatientBag
from milhema.train.inference import predict
from milhema.train.loop import fit
from milhema.train.model import build_model, model_spec

CLASSES = ["negative", "positive"]


def make_bags(n: int, cells: int, dim: int, seed: int = 0) -> list[PatientBag]:
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        m = int(cells * rng.uniform(0.5, 1.5))
        label = i % 2
        x = rng.normal(size=(m, dim)).astype(np.float16)
        if label:
            x[: m // 10, :4] += 2.0   # a few informative cells: learnable, not trivial
        bags.append(PatientBag(f"P{i}", label, x, np.zeros(m, np.int64), np.zeros(m, np.int64),
                               np.full((m, 2), np.nan, np.float32), np.array([str(j) for j in range(m)], object),
                               [f"P{i}_S0"], np.zeros(0, np.float32)))
    return bags


def time_fit(bags: list[PatientBag], test: list[PatientBag], model_name: str, batch_size: int, epochs: int,
             max_cells: int, device: torch.device) -> tuple[float, float]:
    """Seconds per epoch of ``fit`` (first epoch excluded as warm-up), and balanced accuracy on ``test``."""
    config = load_config(None, [f"model.name={model_name}", "fusion.mode=none", f"train.batch_size={batch_size}",
                                f"train.epochs={epochs + 1}", f"train.patience={epochs + 2}",
                                f"data.max_cells={max_cells}", f"data.classes=[{', '.join(CLASSES)}]",
                                "data.patient_features=[]", "data.log_features=[]", "tracking.mode=disabled",
                                f"train.device={device}"])
    spec = model_spec(config, bags[0].features.shape[1], CLASSES, [], [])
    model = build_model(spec)
    model.feature_norm.fit(b.features for b in bags)
    stamps: list[float] = []
    fit(model, bags, [], config, device=device, log=lambda _: stamps.append(time.perf_counter()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    probs = predict(model, test, 16, device=device).probs
    accuracy = balanced_accuracy_score([b.label for b in test], probs.argmax(1))
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), float(accuracy)


def _padded(group: list[PatientBag], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(b.n_cells for b in group)
    x = torch.zeros(len(group), width, group[0].features.shape[1])
    mask = torch.zeros(len(group), width)
    for i, b in enumerate(group):
        x[i, :b.n_cells] = torch.from_numpy(b.features.astype(np.float32))
        mask[i, :b.n_cells] = 1
    y = torch.tensor([float(b.label) for b in group])
    return x.to(device), mask.to(device), y.to(device)


def time_torchmil(bags: list[PatientBag], test: list[PatientBag], epochs: int, device: torch.device,
                  batch_size: int) -> tuple[float, float] | None:
    """Seconds per epoch of torchmil's ABMIL (its own binary loss) one bag per step or in padded
    batches, and its balanced accuracy on ``test``; None without torchmil."""
    try:
        from torchmil.models import ABMIL
    except ImportError:
        return None
    torch.manual_seed(0)
    model = ABMIL(in_shape=(bags[0].features.shape[1],), gated=True).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [_padded(bags[i:i + batch_size], device) for i in range(0, len(bags), batch_size)]
    times = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        model.train()
        for x, mask, y in batches:
            _, losses = model.compute_loss(y, x, mask)
            total = sum(losses.values())
            optimiser.zero_grad()
            total.backward()
            optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x, mask).reshape(-1) for x, mask, _ in
                            (_padded(test[i:i + 16], device) for i in range(0, len(test), 16))])
    accuracy = balanced_accuracy_score([b.label for b in test], (logits > 0).long().cpu().numpy())
    return float(np.mean(times[1:])), float(accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--models", default="abmil,transformer,graph")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    bags = make_bags(args.patients, args.cells, args.dim)
    test = make_bags(args.patients, args.cells, args.dim, seed=1)
    n_cells = sum(b.n_cells for b in bags)
    whole = 10 * args.cells   # larger than any bag: no subsampling
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"## Training speed ({name}, torch {torch.__version__}, {datetime.date.today().isoformat()})", "",
             f"`python tools/bench_train.py --patients {args.patients} --cells {args.cells} --dim {args.dim} "
             f"--epochs {args.epochs} --device {args.device}`: {args.patients} training bags, {n_cells:,} cells, "
             f"{args.dim}-d features, two classes; seconds per epoch (mean of {args.epochs} after a warm-up epoch) "
             f"and balanced accuracy on {len(test)} held-out bags after the {args.epochs + 1} epochs.", "",
             "| model | one bag per step | milhema batches of 16 | speed-up | batches of 16, 128 cells sampled | speed-up |",
             "|---|---|---|---|---|---|"]
    for model_name in args.models.split(","):
        single, acc1 = time_fit(bags, test, model_name, 1, args.epochs, whole, device)
        batched, acc16 = time_fit(bags, test, model_name, 16, args.epochs, whole, device)
        sampled, acc_s = time_fit(bags, test, model_name, 16, args.epochs, 128, device)
        lines.append(f"| {model_name} | {single:.2f} s (bacc {acc1:.2f}) | {batched:.2f} s (bacc {acc16:.2f}) | "
                     f"{single / batched:.1f}× | {sampled:.2f} s (bacc {acc_s:.2f}) | {single / sampled:.1f}× |")
        print(lines[-1], flush=True)
    lines.append("")
    one = time_torchmil(bags, test, args.epochs, device, 1)
    if one is None:
        lines.append("torchmil is not installed in this environment; not compared.")
    else:
        padded = time_torchmil(bags, test, args.epochs, device, 16)
        assert padded is not None
        lines.append(f"torchmil {version('torchmil')} ABMIL (gated, its binary loss, features fed directly to the "
                     f"attention): {one[0]:.2f} s per epoch one bag per step (bacc {one[1]:.2f}), "
                     f"{padded[0]:.2f} s in padded batches of 16 (bacc {padded[1]:.2f}).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        record(text + f"\nMachine: {platform.machine()}, {platform.system()}.\n")


if __name__ == "__main__":
    main()
