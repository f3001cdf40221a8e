"""``milhema cells propose``: which unannotated cells to annotate next (active learning).

From a ``cells train`` run and the bags, the ``budget`` cells whose labels should help the
classifier most, among the cells no one has annotated yet (no ``cell_types`` entry in their bag,
no label in the labels files given), by one of four strategies:

* ``uncertainty``: the largest entropy ``-sum_t p[t] log p[t]`` of the calibrated type probabilities;
* ``margin``: the smallest difference between the two most likely types' probabilities;
* ``coreset``: greedy k-center (Sener & Savarese 2018) on the features standardised as the classifier
  sees them: each pick is the cell farthest from every annotated cell and every cell picked before,
  so the picks cover the feature space rather than its uncertain border;
* ``random``: a uniform sample (the baseline the others are measured against).

The probabilities are the mean of the run's fold models (the classifier ``cells predict`` gives a new
slide). Ties are broken by a permutation drawn from ``seed``: the same seed gives the same cells
in the same order. The proposal is an HTML sheet (thumbnails from the bags, the two most likely
types) and a CSV with an empty ``label`` column; filled in, it goes back with
``milhema cells train --labels``.

Output folder::

    to_annotate.csv    slide_id, cell_id, top1, p1, top2, p2, label (empty), in the order of choice
    to_annotate.html   the same cells with their thumbnails, self-contained (PNG as base64)
    proposal.json      the run, strategy, seed, budget, pool size and the types a label may name
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from milhema.bags import read_bag
from milhema.cells.annotations import NOT_ANNOTATED, CellLabels, read_labels
from milhema.cells.predict import CellRun, bag_paths, check_features, load_cell_run, mean_probabilities
from milhema.data.manifest import Cohort
from milhema.device import resolve_device
from milhema.errors import MilhemaError
from milhema.io import atomic_folder, check_new_folder, write_csv, write_text

STRATEGIES = ("uncertainty", "margin", "coreset", "random")
CSV_COLUMNS = ("slide_id", "cell_id", "top1", "p1", "top2", "p2", "label")
CSV_FILE, HTML_FILE, JSON_FILE = "to_annotate.csv", "to_annotate.html", "proposal.json"


def entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy in nats ``[N]`` of each row of probabilities ``[N, T]`` (0 log 0 = 0)."""
    p = np.asarray(probs, np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)


def top_two(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``[N, 2]`` of the two most likely types of each row of ``probs [N, T]`` (T >= 2), and their
    probabilities ``[N, 2]``."""
    p = np.asarray(probs, np.float64)
    order = np.argsort(-p, axis=1, kind="stable")[:, :2]
    return order, np.take_along_axis(p, order, axis=1)


def k_center(pool: np.ndarray, labelled: np.ndarray, budget: int, rng: np.random.Generator,
             chunk: int = 4096) -> np.ndarray:
    """Greedy k-center: ``budget`` rows of ``pool [P, D]``, each the farthest (Euclidean) from ``labelled [L, D]``
    and the rows chosen before it; the first is drawn with ``rng`` when nothing is labelled.

    Cost: ``P x L`` distances once (in chunks of at most ``chunk`` rows), then ``P`` per pick.
    """
    x = torch.as_tensor(np.asarray(pool, np.float32))
    nearest = torch.full((len(x),), float("inf"))
    if len(labelled):
        centres = torch.as_tensor(np.asarray(labelled, np.float32))
        chunk = max(1, min(chunk, (1 << 24) // len(centres)))   # at most 16M distances (64 MB) at a time
        for start in range(0, len(x), chunk):
            nearest[start:start + chunk] = torch.cdist(x[start:start + chunk], centres).min(dim=1).values
    chosen: list[int] = []
    for _ in range(min(budget, len(x))):
        i = int(rng.integers(len(x))) if not chosen and not len(labelled) else int(torch.argmax(nearest))
        chosen.append(i)
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(x - x[i], dim=1))
        nearest[i] = -1.0   # never again (a duplicate of a chosen cell has distance 0, not below)
    return np.array(chosen, np.int64)


def select(strategy: str, budget: int, *, probs: np.ndarray, features: np.ndarray, labelled: np.ndarray,
           seed: int) -> np.ndarray:
    """The ``budget`` (at most ``P``) rows of the pool to annotate next, in the order of choice.

    Args:
        strategy: one of :data:`STRATEGIES`.
        probs: calibrated type probabilities of the pool's cells ``[P, T]``.
        features: the pool's features ``[P, D]``, standardised as the classifier sees them (``coreset``).
        labelled: the annotated cells' features ``[L, D]``, standardised the same way (``coreset``).
        seed: breaks ties (``uncertainty``, ``margin``), draws the sample (``random``) or the first
            pick without annotated cells (``coreset``).
    """
    rng = np.random.default_rng(seed)
    n, budget = len(probs), min(budget, len(probs))
    if strategy == "random":
        return rng.choice(n, size=budget, replace=False).astype(np.int64)
    if strategy == "coreset":
        return k_center(features, labelled, budget, rng)
    if strategy == "uncertainty":
        score = entropy(probs)
    elif strategy == "margin":
        _, p = top_two(probs)
        score = -(p[:, 0] - p[:, 1])
    else:
        raise MilhemaError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    # Scores rounded so that last-bit differences between machines do not reorder equal cells.
    order = np.lexsort((rng.permutation(n), -np.round(score, 9)))
    return order[:budget].astype(np.int64)


@dataclass
class Pool:
    """The cells of the bags, annotated or not. Arrays share the first dimension N.

    Attributes:
        features: float32 ``[N, D]`` standardised as the classifier sees them (mean of its fold models').
        probs: float32 ``[N, T]`` calibrated type probabilities (mean of the fold models).
        annotated: bool ``[N]``: annotated in the bag or labelled in a labels file.
        slides, cell_ids: ``[N]`` object arrays; rows: int64 ``[N]`` the cell's row in its bag.
        paths: slide id -> its bag file.
    """

    features: np.ndarray
    probs: np.ndarray
    annotated: np.ndarray
    slides: np.ndarray
    cell_ids: np.ndarray
    rows: np.ndarray
    paths: dict[str, Path]


def read_pool(loaded: CellRun, paths: list[Path], labels: CellLabels | None, device: torch.device) -> Pool:
    """Every cell of the bags ``paths``, with the run's probabilities and standardised features."""
    mean = torch.stack([m.mean for m, _ in loaded.models]).mean(dim=0).numpy()
    std = torch.stack([m.std for m, _ in loaded.models]).mean(dim=0).numpy()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("features", "probs", "annotated", "slides", "cells", "rows")}
    where: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise MilhemaError(f"slide {path.stem}: no bag file {path} (run milhema embed first)")
        bag = read_bag(path, thumbnails=False)
        check_features(bag.attrs, bag.feature_dim, bag.slide_id, loaded)
        x = bag.features if loaded.source.columns is None else bag.features[:, list(loaded.source.columns)]
        x = np.asarray(x, np.float32)
        probs, _ = mean_probabilities([m for m, _ in loaded.models], x, device)
        names = [""] * bag.n_cells if bag.cell_types is None else [str(t).strip() for t in bag.cell_types]
        given = {} if labels is None else labels.of_slide(bag.slide_id)
        cells = [str(c) for c in bag.cell_ids]
        parts["annotated"].append(np.array([n not in NOT_ANNOTATED or c in given for n, c in zip(names, cells,
                                                                                                strict=True)], bool))
        parts["features"].append(((x - mean) / std).astype(np.float32))
        parts["probs"].append(probs)
        parts["slides"].append(np.array([bag.slide_id] * bag.n_cells, dtype=object))
        parts["cells"].append(np.array(cells, dtype=object))
        parts["rows"].append(np.arange(bag.n_cells, dtype=np.int64))
        where[bag.slide_id] = path
    if not where:
        raise MilhemaError("no bag to propose cells from")
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return Pool(joined["features"], joined["probs"], joined["annotated"], joined["slides"], joined["cells"],
                joined["rows"], where)


@dataclass
class Proposal:
    """The cells proposed for annotation, in the order of choice (rows of :data:`CSV_COLUMNS`), and how."""

    rows: list[list[str]]
    thumbnails: list[np.ndarray | None]   # uint8 [S, S, 3] per proposed cell, None if its bag has none
    info: dict[str, Any]


def propose(run: str | Path, bags: str | Path | None, cohort: Cohort | None, budget: int, strategy: str, *,
            seed: int = 0, labels: list[Path] | None = None, device: str = "auto") -> Proposal:
    """The ``budget`` unannotated cells of the bags (of ``cohort``'s slides, or every bag of ``bags``) to
    annotate next by ``strategy``, with the classifier of ``run``'s two most likely types for each.

    Raises:
        MilhemaError: not a cells run, bags of other features than the run's, an unknown strategy, a
            budget below 1, or no unannotated cell left.
    """
    if strategy not in STRATEGIES:
        raise MilhemaError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if budget < 1:
        raise MilhemaError(f"budget {budget}: propose at least one cell")
    loaded = load_cell_run(run)
    given = read_labels(labels) if labels else None
    pool = read_pool(loaded, bag_paths(None if bags is None else Path(bags), cohort), given, resolve_device(device))
    free = np.flatnonzero(~pool.annotated)
    if not len(free):
        raise MilhemaError(f"every one of the {len(pool.annotated)} cells of the bags is already annotated: "
                           "nothing to propose")
    picked = free[select(strategy, budget, probs=pool.probs[free], features=pool.features[free],
                         labelled=pool.features[pool.annotated], seed=seed)]
    order, p = top_two(pool.probs[picked])
    types = loaded.types
    rows = [[str(pool.slides[i]), str(pool.cell_ids[i]), types[order[j, 0]], f"{p[j, 0]:.4f}", types[order[j, 1]],
             f"{p[j, 1]:.4f}", ""] for j, i in enumerate(picked)]
    info = {"run": str(Path(run).resolve()), "classifier_sha256": loaded.fingerprint, "strategy": strategy,
            "seed": seed, "budget": budget, "proposed": len(picked), "cells": len(pool.annotated),
            "annotated": int(pool.annotated.sum()), "unannotated": len(free), "types": list(types),
            "labels_files": [] if given is None else given.files,
            "mean_entropy_proposed": round(float(entropy(pool.probs[picked]).mean()), 4),
            "mean_entropy_unannotated": round(float(entropy(pool.probs[free]).mean()), 4)}
    return Proposal(rows, _thumbnails(pool, picked), info)


def _thumbnails(pool: Pool, picked: np.ndarray) -> list[np.ndarray | None]:
    """The bags' thumbnails of the picked cells, reading only the bags that hold one of them."""
    found: list[np.ndarray | None] = [None] * len(picked)
    by_slide: dict[str, list[int]] = {}
    for j, i in enumerate(picked):
        by_slide.setdefault(str(pool.slides[i]), []).append(j)
    for slide, js in by_slide.items():
        bag = read_bag(pool.paths[slide])
        if bag.thumbnails is None:
            continue
        for j in js:
            found[j] = np.asarray(bag.thumbnails[pool.rows[picked[j]]])
    return found


def write_proposal(proposal: Proposal, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the proposal's folder ``out`` (CSV, HTML sheet, JSON) atomically; return it."""
    out = Path(out)
    check_new_folder(out, overwrite=overwrite, what="output folder")
    with atomic_folder(out, overwrite=overwrite, what="output folder") as tmp:
        write_csv(tmp / CSV_FILE, CSV_COLUMNS, proposal.rows)
        write_text(tmp / HTML_FILE, render_sheet(proposal))
        write_text(tmp / JSON_FILE, json.dumps(proposal.info, indent=2) + "\n")
    return out


def _png(thumbnail: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(thumbnail, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_sheet(proposal: Proposal) -> str:
    """The annotation sheet: one self-contained HTML page (no file or network access needed to view it)."""
    info, e = proposal.info, html.escape
    lines = []
    for k, (row, thumb) in enumerate(zip(proposal.rows, proposal.thumbnails, strict=True), start=1):
        slide, cell, top1, p1, top2, p2, _ = row
        image = ('<span class="none">no thumbnail in the bag</span>' if thumb is None
                 else f'<img src="data:image/png;base64,{_png(thumb)}" alt="{e(cell)}">')
        lines.append(f"<tr><td>{k}</td><td>{image}</td><td>{e(slide)}</td><td>{e(cell)}</td>"
                     f"<td>{e(top1)} ({float(p1):.2f})</td><td>{e(top2)} ({float(p2):.2f})</td><td></td></tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Cells to annotate ({e(info['strategy'])})</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }}
img {{ width: 128px; height: 128px; image-rendering: pixelated; }}
td:last-child {{ min-width: 10em; }}
.none {{ color: #888; }}
</style></head><body>
<h1>{info['proposed']} cells to annotate</h1>
<p>Chosen by <b>{e(info['strategy'])}</b> (seed {info['seed']}) among the {info['unannotated']} cells without
annotation ({info['annotated']} of {info['cells']} are annotated), for the cell classifier
{e(info['classifier_sha256'][:12])}. The types shown are its two most likely, with their probabilities.</p>
<p>Write each cell's type in the <code>label</code> column of <code>{CSV_FILE}</code> (same order as below),
one of: {e(', '.join(info['types']))} (or a name that <code>cells.merge</code> maps to one); leave it empty to
skip a cell. Then: <code>milhema cells train ... --labels {CSV_FILE}</code>.</p>
<table><thead><tr><th>#</th><th>cell</th><th>slide</th><th>cell id</th><th>most likely</th><th>second</th>
<th>label</th></tr></thead><tbody>
{chr(10).join(lines)}
</tbody></table></body></html>
"""
