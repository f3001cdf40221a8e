"""Contact sheet of a cohort's crops: one row per cell type, examples from different slides.

    python tools/contact_sheet.py COHORT_DIR [--out contact_sheet.png] [--per-type 10] [--scale 2]

Reads the crops and each slide's cells.csv (written by `milhema synth` or by an annotator), so
it works for simulated and real annotated cohorts alike. Look at the PNG: a hematologist
should recognise every row.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def collect(cohort: Path, per_type: int, seed: int) -> dict[str, list[Path]]:
    """Up to ``per_type`` crop paths per cell type, spread over slides."""
    by_type: dict[str, list[Path]] = defaultdict(list)
    for truth in sorted(cohort.glob("slides/*/cells.csv")):
        with truth.open(encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                by_type[row["cell_type"]].append(truth.parent / row["cell_id"])
    rng = np.random.default_rng(seed)
    return {t: [paths[i] for i in sorted(rng.choice(len(paths), min(per_type, len(paths)), replace=False))]
            for t, paths in sorted(by_type.items())}


def sheet(examples: dict[str, list[Path]], scale: int, label_px: int = 190) -> Image.Image:
    first = next(p for paths in examples.values() for p in paths)
    side = Image.open(first).size[0] * scale
    columns = max(len(p) for p in examples.values())
    canvas = Image.new("RGB", (label_px + columns * (side + 2), len(examples) * (side + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (cell_type, paths) in enumerate(examples.items()):
        y = r * (side + 2)
        draw.text((6, y + side // 2 - 6), f"{cell_type} ({len(paths)})", fill="black")
        for c, path in enumerate(paths):
            crop = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
            canvas.paste(crop, (label_px + c * (side + 2), y))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", type=Path)
    parser.add_argument("--out", type=Path, default=Path("contact_sheet.png"))
    parser.add_argument("--per-type", type=int, default=10)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    examples = collect(args.cohort, args.per_type, args.seed)
    if not examples:
        raise SystemExit(f"no slides/*/cells.csv under {args.cohort}")
    sheet(examples, args.scale).save(args.out)
    print(f"wrote {args.out}: {len(examples)} cell types")


if __name__ == "__main__":
    main()
