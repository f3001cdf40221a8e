"""Active learning (``milhema cells propose``) and labels files (``milhema cells train --labels``).

A small simulated cohort whose ``cells.csv`` keeps the type of one cell in three (the others are
left for annotation, their truth kept aside), embedded with the morphology features; a classifier
trained on the annotated third proposes cells, and the proposal filled with the simulator's truth
goes back into training.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from milhema.bags import read_bag
from milhema.cells.active import CSV_COLUMNS, STRATEGIES, k_center, select
from milhema.cli import build_parser, main

EMBED = ["--backbone", "none", "--morphology", "--workers", "0", "-q"]


@dataclass(frozen=True)
class Partial:
    """A cohort annotated on one cell in three, its bags, a cells run, and the hidden truth ``(slide, cell) -> type``."""

    cohort: Path
    bags: Path
    run: Path
    truth: dict[tuple[str, str], str]


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> Partial:
    root = tmp_path_factory.mktemp("active")
    cohort, bags, run = root / "cohort", root / "bags", root / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["synth", "--out", str(cohort), "--patients", "8", "--seed", "5", "--cells", "30",
                     "--crop-px", "64", "--difficulty", "easy", "--workers", "1", "-q"]) == 0
        truth = {}
        for path in sorted(cohort.glob("slides/*/cells.csv")):
            with open(path, encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            for i, row in enumerate(rows):
                truth[(path.parent.name, row["cell_id"])] = row["cell_type"]
                row["cell_type"] = row["cell_type"] if i % 3 == 0 else ""   # two cells in three left to annotate
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows)
        assert main(["embed", "--cohort", str(cohort), "--out", str(bags), *EMBED]) == 0
        assert main(["cells", "train", "--cohort", str(cohort), "--bags", str(bags), "--out", str(run),
                     "--folds", "3", "--set", "cells.epochs=30", "-q"]) == 0
    finally:
        torch.set_num_threads(before)
    return Partial(cohort, bags, run, truth)


def _propose(p: Partial, out: Path, strategy: str, budget: int = 12, seed: int = 0, *extra: str) -> list[dict[str, str]]:
    assert main(["cells", "propose", "--run", str(p.run), "--bags", str(p.bags), "--budget", str(budget),
                 "--strategy", strategy, "--seed", str(seed), "--out", str(out), *extra, "-q"]) == 0
    with open(out / "to_annotate.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _annotated(p: Partial) -> set[tuple[str, str]]:
    found = set()
    for path in p.bags.glob("*.h5"):
        bag = read_bag(path, thumbnails=False)
        found |= {(bag.slide_id, str(c)) for c, t in zip(bag.cell_ids, bag.cell_types, strict=True) if str(t)}
    return found


def test_propose_writes_distinct_unannotated_cells_deterministically(partial: Partial, tmp_path: Path) -> None:
    annotated = _annotated(partial)
    assert 120 < len(annotated) < len(partial.truth) // 2   # one cell in three
    chosen = {}
    for strategy in ("uncertainty", "margin", "coreset", "random"):
        rows = _propose(partial, tmp_path / strategy, strategy)
        cells = [(r["slide_id"], r["cell_id"]) for r in rows]
        assert len(rows) == 12 and len(set(cells)) == 12 and not set(cells) & annotated
        assert list(rows[0]) == list(CSV_COLUMNS) and all(r["label"] == "" for r in rows)
        assert all(1 >= float(r["p1"]) >= float(r["p2"]) >= 0 and r["top1"] != r["top2"] for r in rows)
        page = (tmp_path / strategy / "to_annotate.html").read_text(encoding="utf-8")
        assert page.count('src="data:image/png;base64,') == 12 and "<script" not in page
        chosen[strategy] = set(cells)
        _propose(partial, tmp_path / f"{strategy}_again", strategy)
        assert (tmp_path / strategy / "to_annotate.csv").read_bytes() == (
            tmp_path / f"{strategy}_again" / "to_annotate.csv").read_bytes()
    assert len({frozenset(c) for c in chosen.values()}) == 4   # the strategies choose differently
    other = _propose(partial, tmp_path / "random_seed1", "random", 12, 1)
    assert {(r["slide_id"], r["cell_id"]) for r in other} != chosen["random"]
    info = json.loads((tmp_path / "uncertainty" / "proposal.json").read_text())
    # Uncertainty sampling proposes the cells the classifier is least sure of.
    assert info["mean_entropy_proposed"] > info["mean_entropy_unannotated"]
    assert info["unannotated"] == len(partial.truth) - len(annotated)
    assert not list(tmp_path.glob(".*partial"))


def test_filled_labels_train_the_classifier_and_are_not_proposed_again(partial: Partial, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rows = _propose(partial, tmp_path / "p", "margin", budget=20)
    for r in rows:   # the annotator: the simulator's truth
        r["label"] = partial.truth[(r["slide_id"], r["cell_id"])]
    rows[0]["label"], rows[1]["label"] = "Blast", ""       # a name not in cells.types, a cell left unlabelled
    annotated = sorted(_annotated(partial))
    slide, cell = annotated[0]
    wrong = "smudge" if partial.truth[(slide, cell)] != "smudge" else "basophil"
    rows.append({"slide_id": slide, "cell_id": cell, "top1": "", "p1": "", "top2": "", "p2": "", "label": wrong})
    filled = tmp_path / "filled.csv"
    with open(filled, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), delimiter=";")   # as Excel saves it
        writer.writeheader()
        writer.writerows(rows)
    capsys.readouterr()
    with_labels = tmp_path / "run"
    assert main(["cells", "train", "--cohort", str(partial.cohort), "--bags", str(partial.bags), "--out",
                 str(with_labels), "--folds", "3", "--set", "cells.epochs=5", "--labels", str(filled), "-q"]) == 0
    out = capsys.readouterr().out
    assert "20 cells (19 added to cells without annotation, 1 replacing another annotation" in out
    assert "'Blast' (1 cells; did you mean 'blast'?)" in out
    report = json.loads((with_labels / "metrics.json").read_text())["annotations"]
    base = json.loads((partial.run / "metrics.json").read_text())["annotations"]
    assert report["annotated"] == base["annotated"] + 18 and report["unknown"]["Blast"]["cells"] == 1
    assert report["labels"]["added"] == 19 and report["labels"]["files"][0]["sha256"]
    with open(with_labels / "cell_predictions.csv", encoding="utf-8") as fh:
        scored = {(r["slide_id"], r["cell_id"]): r["annotated"] for r in csv.DictReader(fh)}
    for r in rows[2:20]:   # every labelled cell is scored out of fold, under its label
        assert scored[(r["slide_id"], r["cell_id"])] == r["label"]
    assert scored[(slide, cell)] == wrong
    # A next proposal leaves out the labelled cells.
    again = _propose(partial, tmp_path / "p2", "margin", 20, 0, "--labels", str(filled))
    assert not {(r["slide_id"], r["cell_id"]) for r in again} & {(r["slide_id"], r["cell_id"]) for r in rows[2:]}


@pytest.mark.parametrize(("case", "fragment"), [
    ("missing cell", "bad.csv row 3: slide {slide} has no cell 'cell_9999.png' in its bag (labelled 'blast')"),
    ("missing slide", "bad.csv row 3: slide 'P9999_S1' is not in the cohort"),
    ("conflict", "bad.csv row 3: cell '{cell}' of slide {slide} is labelled 'blast' here but 'lymphocyte' in bad.csv "
                 "row 2"),
])
def test_a_label_the_bags_cannot_take_is_refused_in_one_line(case: str, fragment: str, partial: Partial,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slide, cell = sorted(partial.truth)[1]
    second = {"missing cell": (slide, "cell_9999.png"), "missing slide": ("P9999_S1", cell), "conflict": (slide, cell)}
    bad = tmp_path / "bad.csv"
    bad.write_text(f"slide_id,cell_id,label\n{slide},{cell},lymphocyte\n{','.join(second[case])},blast\n")
    capsys.readouterr()
    assert main(["cells", "train", "--cohort", str(partial.cohort), "--bags", str(partial.bags), "--out",
                 str(tmp_path / "run"), "--folds", "3", "--labels", str(bad), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment.format(slide=slide, cell=cell) in err, err
    assert not (tmp_path / "run").exists()


def test_k_center_and_the_scores_pick_what_they_say() -> None:
    pool = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [5.0, 5.0]])
    labelled = np.array([[0.0, 0.1]])
    # Farthest from the annotated cell first, then farthest from both (in chunks of any size).
    assert k_center(pool, labelled, 3, np.random.default_rng(0)).tolist() == [2, 3, 1]
    assert k_center(pool, labelled, 3, np.random.default_rng(0), chunk=1).tolist() == [2, 3, 1]
    # The command line offers the library's strategies (listed there so that --help does not load torch).
    parser = build_parser()
    cells = next(a for a in parser._subparsers._group_actions[0].choices["cells"]._subparsers._group_actions)
    propose = cells.choices["propose"]
    assert next(a.choices for a in propose._actions if a.dest == "strategy") == STRATEGIES
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.34, 0.33, 0.33], [0.5, 0.5, 0.0]])
    features = np.zeros((4, 2))
    assert select("uncertainty", 2, probs=probs, features=features, labelled=labelled, seed=0).tolist() == [2, 1]
    assert select("margin", 2, probs=probs, features=features, labelled=labelled, seed=0).tolist() == [3, 2]
    picks = select("random", 4, probs=probs, features=features, labelled=labelled, seed=3)
    assert sorted(picks.tolist()) == [0, 1, 2, 3]
