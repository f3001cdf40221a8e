"""Write a planted-bag cohort in the rare-witness regime: bags of 1,000+ cells, ~1 % diagnostic.

    python tools/witness_cohort.py --out DIR --seed 11 [--patients 80] [--fraction 0.01]
                                   [--cells 1000 2000] [--shift 2.0] [--dim 16]

Half the patients are ``positive``: a fraction ``--fraction`` of their cells (at least one) are
witnesses, whose first four features are shifted by ``--shift`` standard deviations; every other
cell of every bag is N(0, 1) in all ``--dim`` features. Each patient has one slide of a uniform
number of cells in ``--cells``. Writes ``DIR/cohort`` (patients.csv, slides.csv) and ``DIR/bags``
(one HDF5 bag per slide, with the ``diagnostic`` truth). No CBC: run it with
``data.patient_features=[]`` and ``fusion.mode=none``, e.g. with tools/seed_table.py.

With 1 % witnesses a 128-cell training subsample (``data.max_cells``) holds none with probability
0.99^128 = 0.28, and a given witness is in 128 / n of the steps (13 % of a 1,000-cell bag's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from milhema.bags import write_bag

CLASSES = ("negative", "positive")
CONFIG_SET = ["data.classes=[negative, positive]", "data.patient_features=[]", "fusion.mode=none"]


def write_cohort(out: Path, seed: int, patients: int = 80, fraction: float = 0.01, cells: tuple[int, int] = (1000, 2000),
                 shift: float = 2.0, dim: int = 16) -> tuple[Path, Path]:
    """The cohort and bag folders (see the module docstring)."""
    rng = np.random.default_rng(seed)
    cohort, bags = out / "cohort", out / "bags"
    (cohort / "src").mkdir(parents=True, exist_ok=True)
    rows, slides = ["patient_id,label"], ["slide_id,patient_id,source"]
    for i in range(patients):
        label = CLASSES[i % 2]
        n = int(rng.integers(cells[0], cells[1] + 1))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        witness = np.zeros(n, bool)
        if label == "positive":
            witness[rng.choice(n, max(1, round(fraction * n)), replace=False)] = True
            x[witness, :4] += shift
        pid, sid = f"W{i:03d}", f"W{i:03d}_S0"
        rows.append(f"{pid},{label}")
        slides.append(f"{sid},{pid},src")
        write_bag(bags / f"{sid}.h5", x, slide_id=sid, patient_id=pid, diagnostic=witness,
                  cell_ids=[f"c{j}" for j in range(n)], backbone="test/witness")
    (cohort / "patients.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (cohort / "slides.csv").write_text("\n".join(slides) + "\n", encoding="utf-8")
    return cohort, bags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--cells", type=int, nargs=2, default=(1000, 2000))
    parser.add_argument("--shift", type=float, default=2.0)
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args()
    cohort, bags = write_cohort(args.out, args.seed, args.patients, args.fraction, tuple(args.cells), args.shift,
                                args.dim)
    print(f"wrote {args.patients} patients to {cohort} and {bags}; run with --set " + " --set ".join(CONFIG_SET))


if __name__ == "__main__":
    main()
