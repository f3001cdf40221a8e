"""Time to accuracy: wall time of training until a held-out balanced accuracy target is reached
(issue 19 part 1). Seconds per epoch (tools/bench_train.py) hide that batched arms take fewer
optimiser steps per epoch; this benchmark times each arm to the same held-out accuracy.

Two modes:

    # synthetic bags (bench_train's generator), milhema arms through milhema.train.loop.fit
    python tools/bench_time_to_accuracy.py [--patients 64] [--test 128] [--cells 500] [--dim 512] \\
        [--seeds 0,1,2] [--target 0.95] [--max-epochs 40] [--max-seconds 120] [--record]

    # a cohort with bags (e.g. milhema synth + embed --backbone none --morphology): the default
    # config against one bag per step, through milhema.train.run.prepare and train_model's steps (what
    # `milhema train` runs), with held-out patients the run never sees
    python tools/bench_time_to_accuracy.py --cohort COHORT --bags BAGS [--held-out 0.3] [--target 0.8]

Clock: each arm's clock runs from building the model to the end of the epoch at which the
held-out balanced accuracy first reaches ``--target``; the held-out evaluation after every epoch
is excluded from the clock (reported separately as "eval s"). In the synthetic mode the arms get
no inner validation split (nothing to early-stop on: every arm trains to the epoch cap, with its
cosine schedule spanning the cap); in the cohort mode the default inner validation split and
early stopping stay on and their cost is part of the clock, as in ``milhema train``.

Learning rates: the one-bag-per-step arm uses ``--lr`` (default 2e-3, milhema's ``train.lr``).
A batch of B bags uses ``--lr`` unscaled, × sqrt(B) (square-root rule, Malladi et al. 2022, for
Adam-type optimisers) or × B (linear rule, Goyal et al. 2017); every arm keeps milhema's 2-epoch
linear warm-up and gradient clipping at norm 1.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from bench_train import CLASSES, _padded, make_bags  # tools/ is on sys.path when a tool runs as a script
from perf_record import record
from sklearn.metrics import balanced_accuracy_score

from milhema.config import load_config
from milhema.device import resolve_device
from milhema.settings import Settings
from milhema.train.data import PatientBag
from milhema.train.inference import predict
from milhema.train.loop import fit
from milhema.train.model import PatientModel, build_model, model_spec


@dataclass(frozen=True)
class Arm:
    """One way to train: ``batch`` bags per step, ``max_cells`` sampled per bag (None = whole),
    ``rule`` scaling the base learning rate to the batch; ``torchmil`` = torchmil's ABMIL."""

    name: str
    batch: int
    max_cells: int | None
    rule: str = "none"      # none | sqrt | linear
    torchmil: bool = False

    def lr(self, base: float) -> float:
        """The arm's learning rate from the one-bag-per-step ``base``."""
        scale = {"none": 1.0, "sqrt": math.sqrt(self.batch), "linear": float(self.batch)}[self.rule]
        return base * scale


@dataclass
class Result:
    """One arm, one seed: the held-out balanced accuracy after every epoch and the clock at each."""

    arm: Arm
    seed: int
    steps_per_epoch: int
    bacc: list[float] = field(default_factory=list)       # [epochs] held-out balanced accuracy
    clock: list[float] = field(default_factory=list)      # [epochs] training seconds at the epoch's end
    eval_s: float = 0.0                                    # held-out evaluation, outside the clock

    def reached(self, target: float) -> int | None:
        """The first epoch (1-based) at the target, None if never."""
        return next((i + 1 for i, a in enumerate(self.bacc) if a >= target - 1e-9), None)

    def time_to(self, target: float) -> float:
        """Training seconds to the target (inf if never reached)."""
        epoch = self.reached(target)
        return math.inf if epoch is None else self.clock[epoch - 1]


class _Stop(Exception):
    """Raised from the per-epoch callback to end ``fit`` at the target or a cap."""


class Stopwatch:
    """Training seconds: :meth:`lap` ends a stretch of training, :meth:`go` starts the next one
    (the held-out evaluation between them is not counted)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._since = time.perf_counter()

    def lap(self) -> float:
        self.total += time.perf_counter() - self._since
        return self.total

    def go(self) -> None:
        self._since = time.perf_counter()


def _held_out(bags: Sequence[PatientBag]) -> Callable[[PatientModel, torch.device], float]:
    labels = [b.label for b in bags]

    def score(model: PatientModel, device: torch.device) -> float:
        probs = predict(model, bags, 16, device=device).probs
        return float(balanced_accuracy_score(labels, probs.argmax(1)))
    return score


def _until(result: Result, watch: Stopwatch, score: Callable[[], float], target: float, stop_at_target: bool,
           max_seconds: float) -> None:
    """The per-epoch bookkeeping shared by both trainers: stop the clock, score, stop or go on."""
    result.clock.append(watch.lap())
    start = time.perf_counter()
    result.bacc.append(score())
    result.eval_s += time.perf_counter() - start
    if (stop_at_target and result.bacc[-1] >= target) or result.clock[-1] >= max_seconds:
        raise _Stop
    watch.go()


def run_milhema(arm: Arm, settings: Settings, train: Sequence[PatientBag], test: Sequence[PatientBag], seed: int,
                args: argparse.Namespace, device: torch.device) -> Result:
    """``arm`` trained by milhema's own ``fit`` (collate, bucketing, schedule), scored after each epoch."""
    result = Result(arm, seed, math.ceil(len(train) / arm.batch))
    score = _held_out(test)
    watch = Stopwatch()
    torch.manual_seed(seed)   # initial weights
    spec = model_spec(settings, train[0].features.shape[1], CLASSES, [], [])
    model = build_model(spec)
    model.feature_norm.fit(b.features for b in train)

    def log(_: dict[str, object]) -> None:
        _until(result, watch, lambda: score(model, device), args.target, args.stop_at_target, args.max_seconds)

    try:
        fit(model, train, [], settings, device=device, log=log, seed=seed)
    except _Stop:
        pass
    return result


def run_torchmil(arm: Arm, train: Sequence[PatientBag], test: Sequence[PatientBag], seed: int,
                 args: argparse.Namespace, device: torch.device) -> Result:
    """torchmil's gated ABMIL with its own binary loss, AdamW at a constant learning rate, bags
    shuffled every epoch and padded per batch (bench_train's ``_padded``)."""
    from torchmil.models import ABMIL

    result = Result(arm, seed, math.ceil(len(train) / arm.batch))
    watch = Stopwatch()
    torch.manual_seed(seed)
    model = ABMIL(in_shape=(train[0].features.shape[1],), gated=True).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=arm.lr(args.lr))
    rng = np.random.default_rng(seed)
    test_batches = [_padded(list(test[i:i + 16]), device) for i in range(0, len(test), 16)]
    labels = [b.label for b in test]

    @torch.no_grad()
    def score() -> float:
        model.eval()
        logits = torch.cat([model(x, mask).reshape(-1) for x, mask, _ in test_batches])
        return float(balanced_accuracy_score(labels, (logits > 0).long().cpu().numpy()))

    try:
        for _ in range(args.max_epochs):
            model.train()
            order = rng.permutation(len(train))
            for i in range(0, len(order), arm.batch):
                x, mask, y = _padded([train[j] for j in order[i:i + arm.batch]], device)
                _, losses = model.compute_loss(y, x, mask)
                optimiser.zero_grad()
                sum(losses.values()).backward()
                optimiser.step()
            _until(result, watch, score, args.target, args.stop_at_target, args.max_seconds)
    except _Stop:
        pass
    return result


def synthetic_settings(arm: Arm, args: argparse.Namespace, seed: int, device: torch.device) -> Settings:
    whole = 10 * args.cells   # larger than any bag: no subsampling
    return load_config(None, [f"model.name={args.model}", "fusion.mode=none", f"train.batch_size={arm.batch}",
                              f"train.lr={arm.lr(args.lr)}", f"train.epochs={args.max_epochs}",
                              f"train.patience={args.max_epochs + 1}", f"train.seed={seed}",
                              f"data.max_cells={arm.max_cells or whole}", f"data.classes=[{', '.join(CLASSES)}]",
                              "data.patient_features=[]", "data.log_features=[]", "tracking.mode=disabled",
                              f"train.device={device}"])


SYNTHETIC_ARMS = [
    Arm("one bag per step", 1, None),
    Arm("padded 16", 16, None),
    Arm("padded 16, sqrt lr", 16, None, "sqrt"),
    Arm("padded 16, linear lr", 16, None, "linear"),
    Arm("16 × 128 cells (default)", 16, 128),
    Arm("16 × 128 cells, sqrt lr", 16, 128, "sqrt"),
    Arm("16 × 128 cells, linear lr", 16, 128, "linear"),
    Arm("torchmil ABMIL, one bag per step", 1, None, torchmil=True),
    Arm("torchmil ABMIL, padded 16, sqrt lr", 16, None, "sqrt", torchmil=True),
]


def _fmt_time(t: float) -> str:
    return "not reached" if math.isinf(t) else f"{t:.1f} s"


def summary(results: list[Result], target: float, base_name: str, lr_of: Callable[[Arm], str]) -> list[str]:
    """The per-seed rows and the table of medians over seeds, with the ratio to ``base_name``."""
    arms = list(dict.fromkeys(r.arm for r in results))
    lines = ["| arm | seed | lr | time to target | epochs (steps) to target | bacc at end | best bacc | epochs run | "
             "train s | eval s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (arms.index(r.arm), r.seed)):
        epoch = r.reached(target)
        to = "—" if epoch is None else f"{epoch} ({epoch * r.steps_per_epoch})"
        lines.append(f"| {r.arm.name} | {r.seed} | {lr_of(r.arm)} | {_fmt_time(r.time_to(target))} | {to} | "
                     f"{r.bacc[-1]:.2f} | {max(r.bacc):.2f} | {len(r.bacc)} | {r.clock[-1]:.1f} | {r.eval_s:.1f} |")
    base = statistics.median(r.time_to(target) for r in results if r.arm.name == base_name)
    lines += ["", "| arm | lr | reached | median time to target | speed-up vs one bag per step | median epochs to target | "
              "median bacc at end | median s per epoch |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        mine = [r for r in results if r.arm == arm]
        times = [r.time_to(target) for r in mine]
        med = statistics.median(times)
        epochs = [float(r.reached(target) or math.inf) for r in mine]
        med_ep = statistics.median(epochs)
        ratio = "—" if math.isinf(med) or math.isinf(base) else f"{base / med:.2f}×"
        per_epoch = statistics.median(r.clock[-1] / len(r.clock) for r in mine)
        lines.append(f"| {arm.name} | {lr_of(arm)} | {sum(not math.isinf(t) for t in times)}/{len(mine)} | "
                     f"{_fmt_time(med)} | {ratio} | {'—' if math.isinf(med_ep) else f'{med_ep:g}'} | "
                     f"{statistics.median(r.bacc[-1] for r in mine):.2f} | {per_epoch:.2f} s |")
    return lines


def synthetic(args: argparse.Namespace, device: torch.device) -> list[str]:
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in SYNTHETIC_ARMS if not a.torchmil or _has_torchmil()]
    if args.arms:
        arms = [arms[int(i)] for i in args.arms.split(",")]
    results = []
    for k, seed in enumerate(seeds):
        train = make_bags(args.patients, args.cells, args.dim, seed=100 + seed)
        test = make_bags(args.test, args.cells, args.dim, seed=200 + seed)
        # Arms interleaved within a seed, in an order rotated per seed, so load drifting over the
        # run does not fall on the same arm every time.
        for arm in arms[k % len(arms):] + arms[:k % len(arms)]:
            if arm.torchmil:
                r = run_torchmil(arm, train, test, seed, args, device)
            else:
                r = run_milhema(arm, synthetic_settings(arm, args, seed, device), train, test, seed, args, device)
            results.append(r)
            print(f"seed {seed} {arm.name}: {_fmt_time(r.time_to(args.target))}, end bacc {r.bacc[-1]:.2f} "
                  f"after {len(r.bacc)} epochs ({r.clock[-1]:.1f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    n_cells = sum(b.n_cells for b in make_bags(args.patients, args.cells, args.dim, seed=100 + seeds[0]))
    extra = f", torchmil {version('torchmil')}" if _has_torchmil() else ", torchmil not installed"
    head = [f"`python tools/bench_time_to_accuracy.py {' '.join(sys.argv[1:])}`: {args.model}, {args.patients} "
            f"training bags ({n_cells:,} cells for seed {seeds[0]}), {args.test} held-out bags, {args.dim}-d "
            f"synthetic features (bench_train's generator), seeds {args.seeds}; target held-out balanced "
            f"accuracy {args.target}; cap {args.max_epochs} epochs or {args.max_seconds:g} s of training; "
            f"base lr {args.lr:g}{extra}.", ""]
    return head + summary(results, args.target, "one bag per step",
                          lambda a: f"{a.lr(args.lr):.2g}" + ("" if a.rule == "none" else f" ({a.rule})"))


def _has_torchmil() -> bool:
    try:
        import torchmil  # noqa: F401
    except ImportError:
        return False
    return True


def cohort_mode(args: argparse.Namespace) -> list[str]:
    """Default config against one bag per step on a cohort, through prepare and the steps of train_model."""
    from milhema.data import load_cohort
    from milhema.train.run import inner_split, prepare

    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {"default (16 × 128 cells, lr 2e-3)": [],
                "16 × 128 cells, lr 8e-3 (sqrt rule from 2e-3 at one bag)": ["train.lr=8e-3"],
                "one bag per step, whole bags, lr 2e-3": ["train.batch_size=1", "data.max_cells=100000"],
                "one bag per step, whole bags, lr 5e-4 (sqrt rule from 16)": ["train.batch_size=1",
                                                                             "data.max_cells=100000",
                                                                             "train.lr=5e-4"],
                "one bag per step, 128 cells, lr 5e-4 (sqrt rule from 16)": ["train.batch_size=1",
                                                                             "train.lr=5e-4"]}
    results: list[Result] = []
    arms = {name: Arm(name, 1 if "train.batch_size=1" in sets else 16, None) for name, sets in variants.items()}
    for k, seed in enumerate(seeds):
        names = list(variants)
        for name in names[k % len(names):] + names[:k % len(names)]:
            overrides = [*variants[name], f"train.seed={seed}", "tracking.mode=disabled", "train.device=cpu",
                         f"train.epochs={args.max_epochs}", *args.set]
            settings = load_config(None, overrides)
            cohort = load_cohort(args.cohort, settings.data.classes)
            prep = prepare(settings, cohort, args.bags)
            labels = prep.cohort.labels(prep.ids)
            # Held-out patients: never trained on, never used for early stopping.
            rest, held = inner_split(prep.ids, labels, args.held_out, 1000 + seed)
            train_ids, val_ids = inner_split(rest, prep.cohort.labels(rest), settings.train.val_fraction, seed)
            held_bags = prep.store.many(held)
            device = torch.device("cpu")
            score = _held_out(held_bags)
            arm = arms[name]
            result = Result(arm, seed, math.ceil(len(train_ids) / settings.train.batch_size))
            for pid in prep.ids:  # read every bag before the clock starts (data.cache keeps them)
                prep.store.get(pid)
            watch = Stopwatch()
            try:
                watch.go()
                # train_model's steps (milhema.train.run), with the model in hand for the held-out score;
                # the temperature it fits afterwards does not change the argmax.
                torch.manual_seed(seed)
                model = build_model(prep.spec)
                train_bags = prep.store.many(train_ids)
                model.feature_norm.fit(b.features for b in train_bags)
                if model.cbc_encoder is not None:
                    model.cbc_encoder.fit(np.stack([b.cbc for b in train_bags]))

                scorer = functools.partial(score, model, device)

                def log(_: dict[str, object], result: Result = result, watch: Stopwatch = watch,
                        scorer: Callable[[], float] = scorer) -> None:
                    _until(result, watch, scorer, args.target, args.stop_at_target, args.max_seconds)

                fit(model, train_bags, prep.store.many(val_ids), settings, device=device, log=log, seed=seed)
            except _Stop:
                pass
            results.append(result)
            print(f"seed {seed} {name}: {_fmt_time(result.time_to(args.target))}, end bacc {result.bacc[-1]:.2f} "
                  f"(best {max(result.bacc):.2f}) "
                  f"after {len(result.bacc)} epochs ({result.clock[-1]:.1f} s, load {os.getloadavg()[0]:.1f})",
                  flush=True)
    head = [f"`python tools/bench_time_to_accuracy.py {' '.join(sys.argv[1:])}`: {len(prep.ids)} patients, "
            f"{len(held)} held out ({args.held_out:g}, stratified, drawn per seed), the rest split into training and "
            f"early-stopping validation as `milhema train` does; {len(prep.cohort.classes)} classes; target held-out "
            f"balanced accuracy {args.target}; cap {args.max_epochs} epochs or {args.max_seconds:g} s.", ""]
    tables = []
    for target in [args.target, *args.also_targets]:
        tables += [f"Target {target}:", "", *summary(results, target, "one bag per step, whole bags, lr 2e-3",
                                                     lambda a: "see arm"), ""]
    return head + tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--test", type=int, default=128, help="held-out bags (synthetic mode)")
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--model", default="abmil")
    parser.add_argument("--lr", type=float, default=2e-3, help="the one-bag-per-step learning rate")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--also-targets", type=float, nargs="*", default=[],
                        help="further targets to tabulate from the same runs (cohort mode)")
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="training seconds per arm and seed")
    parser.add_argument("--stop-at-target", action="store_true",
                        help="end an arm at the target (faster; 'bacc at end' is then the accuracy at the target)")
    parser.add_argument("--arms", default="", help="comma-separated indices into the arm list (default all)")
    parser.add_argument("--cohort", type=Path, help="cohort folder: the cohort mode")
    parser.add_argument("--bags", type=Path)
    parser.add_argument("--held-out", type=float, default=0.3)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every cohort arm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0 = torch's default); 1 on a CPU that other jobs share, where "
                             "spinning threads wait for each other")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # The first torch optimiser of a process imports torch._dynamo (seconds); pay it here, not on
    # the clock of whichever arm happens to run first.
    torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
    load = os.getloadavg()
    started = time.perf_counter()
    if args.cohort is not None:
        title, lines = "cohort", cohort_mode(args)
    else:
        title, lines = "synthetic bags", synthetic(args, resolve_device(args.device))
    after = os.getloadavg()
    lines = [f"## Time to accuracy (CPU), {title} ({datetime.date.today().isoformat()})", "", *lines, "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; load average {load[0]:.1f} at the start, {after[0]:.1f} at the end; "
             f"{time.perf_counter() - started:.0f} s in all."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
