"""Bad input through the real command line: exit status 2, one line that names the file, row or
value and says what to do, no traceback, and nothing half-written left behind.

Inputs are real files: the simulated cohort of ``tiny_cohort`` (CSV, PNG crops), its bags from
``milhema embed``, a run from ``milhema train``, HDF5 files mutated with h5py, TIFF scans from the
simulator.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from milhema.bags import read_bag, write_bag
from milhema.cli import main
from milhema.synth.smear import plan_smear, write_smear
from milhema.synth.stain import Stain

QUIET = ["-q"]
TRAIN_FAST = ["--set", "train.epochs=1", "train.batch_size=4", "model.hidden_dim=8"]
EMBED_FAST = ["--backbone", "none", "--morphology", "--workers", "0", "-q"]


@dataclass(frozen=True)
class World:
    """A cohort folder, its bags and a trained run (shared, never modified by a test)."""

    cohort: Path
    bags: Path
    run: Path


@pytest.fixture(scope="module")
def world(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    bags, run = root / "bags", root / "run"
    assert main(["embed", "--cohort", str(tiny_cohort), "--out", str(bags), *EMBED_FAST]) == 0
    assert main(["train", "--cohort", str(tiny_cohort), "--bags", str(bags), "--out", str(run), *TRAIN_FAST,
                 *QUIET]) == 0
    return World(tiny_cohort, bags, run)


def _cohort_copy(world: World, tmp: Path) -> Path:
    """A copy of the cohort's two CSVs whose sources point at the shared crop folders."""
    copy = tmp / "cohort"
    copy.mkdir()
    shutil.copy(world.cohort / "patients.csv", copy)
    slides = (world.cohort / "slides.csv").read_text().replace(",slides/", f",{world.cohort}/slides/")
    (copy / "slides.csv").write_text(slides)
    return copy


def _edit(path: Path, old: str, new: str, encoding: str = "utf-8") -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_bytes(text.replace(old, new, 1).encode(encoding))


def _bags_copy(world: World, tmp: Path) -> tuple[Path, Path]:
    """A copy of the bag folder and the path of its first bag."""
    bags = tmp / "bags"
    shutil.copytree(world.bags, bags)
    return bags, sorted(bags.glob("*.h5"))[0]


def _train(world: World, cohort: Path, bags: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--cohort", str(cohort), "--bags", str(bags), "--out", str(out), *TRAIN_FAST, *extra, *QUIET]


def _predict(world: World, bags: Path, out: Path) -> list[str]:
    return ["predict", "--run", str(world.run), "--cohort", str(world.cohort), "--bags", str(bags), "--out", str(out)]


def _embed(cohort: Path, out: Path, *extra: str) -> list[str]:
    return ["embed", "--cohort", str(cohort), "--out", str(out), *EMBED_FAST, *extra]


# --- each case: build the bad input in tmp, return the command line ----------------------------

def manifest_case(csv: str, old: str, new: str, encoding: str = "utf-8") -> Callable[[World, Path, Path], list[str]]:
    def build(world: World, tmp: Path, out: Path) -> list[str]:
        cohort = _cohort_copy(world, tmp)
        _edit(cohort / csv, old, new, encoding)
        return _train(world, cohort, world.bags, out)
    return build


def bags_case(damage: Callable[[Path], None]) -> Callable[[World, Path, Path], list[str]]:
    def build(world: World, tmp: Path, out: Path) -> list[str]:
        bags, first = _bags_copy(world, tmp)
        damage(first)
        return _train(world, world.cohort, bags, out)
    return build


def rewritten_bags(dim: int | None, backbone: str) -> Callable[[World, Path, Path], list[str]]:
    """Every bag re-written with another feature size or backbone than the run was trained on."""
    def build(world: World, tmp: Path, out: Path) -> list[str]:
        bags, _ = _bags_copy(world, tmp)
        for path in bags.glob("*.h5"):
            bag = read_bag(path)
            features = bag.features if dim is None else np.zeros((bag.n_cells, dim), np.float32)
            write_bag(path, features, slide_id=bag.slide_id, patient_id=str(bag.patient_id),
                      cell_ids=bag.cell_ids, backbone=backbone)
        return _predict(world, bags, out)
    return build


def damaged_run(world: World, tmp: Path, out: Path) -> list[str]:
    run = tmp / "run"
    shutil.copytree(world.run, run)
    (run / "config.yaml").write_text("data: [\n")
    return ["predict", "--run", str(run), "--cohort", str(world.cohort), "--bags", str(world.bags), "--out", str(out)]


def config_case(text: str | bytes) -> Callable[[World, Path, Path], list[str]]:
    def build(world: World, tmp: Path, out: Path) -> list[str]:
        config = tmp / "config.yaml"
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        return _train(world, world.cohort, world.bags, out, "--config", str(config))
    return build


def set_case(*overrides: str) -> Callable[[World, Path, Path], list[str]]:
    def build(world: World, tmp: Path, out: Path) -> list[str]:
        return _train(world, world.cohort, world.bags, out, "--set", *overrides)
    return build


def crops_case(damage: Callable[[Path], None]) -> Callable[[World, Path, Path], list[str]]:
    """A crop folder of the first slide damaged; embedding with --fail-on-bad-image."""
    def build(world: World, tmp: Path, out: Path) -> list[str]:
        cohort = tmp / "cohort"
        shutil.copytree(world.cohort, cohort)
        damage(sorted((cohort / "slides").iterdir())[0])
        return _embed(cohort, out, "--fail-on-bad-image")
    return build


def scan_case(write: Callable[[Path], None]) -> Callable[[World, Path, Path], list[str]]:
    def build(world: World, tmp: Path, out: Path) -> list[str]:
        cohort = tmp / "cohort"
        cohort.mkdir()
        write(cohort / "scan.tiff")
        (cohort / "patients.csv").write_text("patient_id,label\nP1,AML\n")
        (cohort / "slides.csv").write_text("slide_id,patient_id,source\nS1,P1,scan.tiff\n")
        return _embed(cohort, out)
    return build


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop(name: str) -> Callable[[Path], None]:
    def drop(path: Path) -> None:
        with h5py.File(path, "a") as f:
            del f[name]
    return drop


def _nan(path: Path) -> None:
    with h5py.File(path, "a") as f:
        f["features"][0, 0] = np.nan


def _empty_folder(folder: Path) -> None:
    for png in folder.glob("*.png"):
        png.unlink()


def _corrupt_png(folder: Path) -> None:
    (folder / "cell_9999.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


def _plain_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.full((300, 300, 3), 230, np.uint8), tile=(256, 256), photometric="rgb")


CASES: dict[str, tuple[Callable[[World, Path, Path], list[str]], str]] = {
    # manifest
    "header only": (manifest_case("patients.csv", "\nP0001,", "\n,"), "patients.csv row 2: patient_id is empty"),
    "missing column": (manifest_case("patients.csv", "patient_id,label,", "patient_id,diagnosis,"),
                       "patients.csv row 1: required column 'label' is missing; the header has 'patient_id, diagnosis, age"),
    # a CBC name one letter from another is another quantity (anc, amc): only spellings are suggested
    "CBC column named another way": (manifest_case("patients.csv", ",anc,", ",PNN,"),
                                     "patients.csv row 1: required column 'anc' is missing; the header has "
                                     "'patient_id, label, age, sex, wbc, rbc, hb, mcv, ...'"),
    "CBC column with its unit": (manifest_case("patients.csv", ",anc,", ",ANC (G/L),"),
                                 "patients.csv row 1: required column 'anc' is missing (found 'ANC (G/L)'; rename "
                                 "it, with its values in the units of docs/DOMAIN.md)"),
    "CBC column with a power of ten": (manifest_case("patients.csv", ",wbc,", ",wbc_10^9/L,"),
                                       "required column 'wbc' is missing (found 'wbc_10^9/L'; rename it"),
    "id column spelt another way": (manifest_case("slides.csv", "slide_id,", "Slide ID,"),
                                    "slides.csv row 1: required column 'slide_id' is missing (found 'Slide ID'; "
                                    "rename it)"),
    "row with a stray comma": (manifest_case("patients.csv", "\nP0002,MDS,", "\nP0002,MDS,,"),
                               "patients.csv row 3: 18 values for 17 columns"),
    "duplicate patient": (manifest_case("patients.csv", "\nP0002,", "\nP0001,"),
                          "patients.csv row 3: patient_id 'P0001' already used in row 2"),
    "unknown label": (manifest_case("patients.csv", "P0001,reactive,", "P0001,AMl,"),
                      "patients.csv row 2: label 'AMl' is not one of AML, MDS, VEXAS, reactive (did you mean 'AML'?)"),
    "non-numeric CBC": (manifest_case("patients.csv", ",F,15.22,", ",F,high,"), "patients.csv row 2: wbc 'high' is not a number"),
    "not UTF-8": (manifest_case("patients.csv", "P0001,", "P\xe9,", "latin-1"), "patients.csv: not UTF-8 text (byte"),
    "slide of a missing patient": (manifest_case("slides.csv", ",P0001,", ",P0091,"),
                                   "slides.csv row 2: patient_id 'P0091' of slide 'P0001_S1' is not in patients.csv"),
    "duplicate slide": (manifest_case("slides.csv", "P0002_S1,", "P0001_S1,"),
                        "slides.csv row 3: slide_id 'P0001_S1' already used in row 2"),
    "missing source": (manifest_case("slides.csv", "slides/P0001_S1", "slides/nowhere"),
                       "slides/nowhere' of slide 'P0001_S1' does not exist"),
    "slide id ../evil": (manifest_case("slides.csv", "P0001_S1,", "../evil,"), "slide_id '../evil' is not safe as a file name"),
    "slide id /abs": (manifest_case("slides.csv", "P0001_S1,", "/abs,"), "slide_id '/abs' is not safe as a file name"),
    "slide id a\\b": (manifest_case("slides.csv", "P0001_S1,", "a\\b,"), "slide_id 'a\\\\b' is not safe as a file name"),
    "patient id ../x": (manifest_case("patients.csv", "P0001,", "../x,"), "patient_id '../x' is not safe as a file name"),
    # bags
    "truncated bag": (bags_case(_truncate), "is not a readable HDF5 file (truncated or corrupt; re-run embed"),
    "bag not HDF5": (bags_case(lambda p: p.write_text("features,coords\n1,2\n")), "is not a readable HDF5 file"),
    "bag without features": (bags_case(_drop("features")), "has no 'features' dataset"),
    "bag without cell ids": (bags_case(_drop("cell_ids")), "has no 'cell_ids' dataset"),
    "bag with NaN": (bags_case(_nan), "has NaN or Inf features; re-run embed"),
    "bags of another feature size": (rewritten_bags(7, "none"), "but these bags come from none (7)"),
    "bags of another backbone": (rewritten_bags(None, "timm/other"), "but these bags come from timm/other ("),
    "run with a damaged config.yaml": (damaged_run, "run/config.yaml: cannot be read as the run's config (ParserError)"),
    # config
    "unknown config key": (config_case("train:\n  epoch: 3\n"), "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    "wrong type": (config_case("train:\n  lr: fast\n"), "'train.lr' must be float, got 'fast'"),
    "negative lr": (config_case("train:\n  lr: -0.001\n"), "train.lr must be between 0 and 1, got -0.001"),
    "duplicate config key": (config_case("train:\n  lr: 0.1\n  lr: 0.2\n"), "key 'lr' appears twice (line 3)"),
    "config not UTF-8": (config_case(b"train:\n  lr: 0.1 \xe9\n"), "not UTF-8 text"),
    "config not YAML": (config_case("train: [1, 2\n"), "not valid YAML"),
    "epochs 0": (set_case("train.epochs=0"), "train.epochs must be at least 1, got 0"),
    "batch size 0": (set_case("train.batch_size=0"), "train.batch_size must be at least 1, got 0"),
    "dropout above 1": (set_case("model.dropout=1.5"), "dropout must be in [0, 1), got 1.5"),
    "max cells 0": (set_case("data.max_cells=0"), "data.max_cells must be at least 1, got 0"),
    "unknown model": (set_case("model.name=abmill"), "model.name 'abmill' is not one of"),
    "unknown fusion": (set_case("fusion.mode=concatenate"), "(did you mean 'concat'?)"),
    "class name with a path": (set_case("data.classes=[../x, AML]"), "class name '../x' cannot be used in file names"),
    "negative weight decay": (set_case("train.weight_decay=-1"), "train.weight_decay must be at least 0"),
    # crop folders, with --fail-on-bad-image
    "empty crop folder": (crops_case(_empty_folder), "holds no images"),
    "file that is not an image": (crops_case(lambda f: (f / "notes.txt").write_text("x")), "are not images (notes.txt)"),
    "corrupt image": (crops_case(_corrupt_png), "cell_9999.png: not a readable image"),
    # scans
    "unreadable scan": (scan_case(lambda p: p.write_bytes(b"II*\x00garbage" * 20)),
                        "slide S1: scan.tiff is not a readable whole-slide image"),
    "scan without mpp": (scan_case(_plain_tiff), "no microns-per-pixel in its metadata; add an 'mpp' column"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(name: str, world: World, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    build, fragment = CASES[name]
    out = tmp_path / "out"
    argv = build(world, tmp_path, out)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("milhema: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.partial"))
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == [], written


def test_empty_patients_file(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort = _cohort_copy(world, tmp_path)
    (cohort / "patients.csv").write_bytes(b"")
    assert main(_train(world, cohort, world.bags, tmp_path / "out")) == 2
    assert capsys.readouterr().err == "milhema: error: patients.csv: file is empty (expected a header row)\n"


def test_debug_shows_the_traceback(world: World, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epoch: 3\n")
    argv = ["train", "--config", str(config), "--cohort", str(world.cohort), "--bags", str(world.bags),
            "--out", str(tmp_path / "out")]
    plain = subprocess.run([sys.executable, "-m", "milhema", *argv], capture_output=True, text=True, timeout=120)
    debug = subprocess.run([sys.executable, "-m", "milhema", *argv, "--debug"], capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == debug.returncode == 2
    assert plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_bad_crops_are_skipped_with_a_count(world: World, tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    shutil.copytree(world.cohort, cohort)
    first, second = sorted((cohort / "slides").iterdir())[:2]
    _empty_folder(first)
    (second / "notes.txt").write_text("not a cell")
    _corrupt_png(second)
    out = tmp_path / "bags"
    result = subprocess.run([sys.executable, "-m", "milhema", *_embed(cohort, out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"1 slide without cells: {first.name}" in result.stdout and "1 unreadable image skipped" in result.stdout
    warnings = result.stderr.strip().splitlines()
    assert any(f"slide {second.name}: 1 file(s) in crop folder" in w and "(notes.txt); skipped" in w for w in warnings)
    assert any("cell_9999.png: not a readable image" in w for w in warnings)
    assert any(f"slide {first.name}: no readable cells; wrote an empty bag" in w for w in warnings)
    assert read_bag(out / f"{first.name}.h5").n_cells == 0
    assert "cell_9999.png" not in set(read_bag(out / f"{second.name}.h5").cell_ids)


def test_scan_without_cells_gives_an_empty_bag(world: World, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    spec = plan_smear([], 768, 768, 0.25, (3, 1), Stain.default())   # red cells and platelets, no white cell
    write_smear(tmp_path / "scan.tiff", spec)
    (tmp_path / "patients.csv").write_text("patient_id,label\nP1,AML\nP2,MDS\n")
    (tmp_path / "slides.csv").write_text("slide_id,patient_id,source\nS1,P1,scan.tiff\n")
    capsys.readouterr()
    # Alone it is a cohort without a single cell: refused, and no bag written.
    assert main(_embed(tmp_path, tmp_path / "alone")) == 2
    assert capsys.readouterr().err == ("milhema: error: no cell in slide S1: no white cell was detected in the scan; "
                                       "check that the scans are stained smears and that their microns per pixel "
                                       "are right (the mpp column of slides.csv); check the sources in slides.csv\n")
    assert not list((tmp_path / "alone").glob("*.h5"))
    # Beside a slide with cells it gives an empty bag, reported.
    crops = sorted((world.cohort / "slides").iterdir())[0]
    (tmp_path / "slides.csv").write_text(f"slide_id,patient_id,source,mpp\nS1,P1,scan.tiff,\nS2,P2,{crops},0.375\n")
    assert main(_embed(tmp_path, tmp_path / "bags")) == 0
    assert "1 slide without cells: S1" in capsys.readouterr().out
    assert read_bag(tmp_path / "bags" / "S1.h5").n_cells == 0 and read_bag(tmp_path / "bags" / "S2.h5").n_cells > 0


def test_cell_ids_never_become_paths(world: World, tmp_path: Path) -> None:
    # Cell ids come from user files (crop names, foreign bags); explain must not write where they point.
    bags, first = _bags_copy(world, tmp_path)
    bag = read_bag(first)
    hostile = ["../../escaped.png", "/tmp/absolute.png", "a/b/c.png", "..", "~/home.png"]
    cell_ids = [*hostile, *bag.cell_ids[len(hostile):]][: bag.n_cells]
    write_bag(first, bag.features, slide_id=bag.slide_id, patient_id=str(bag.patient_id), cell_ids=cell_ids,
              thumbnails=bag.thumbnails, backbone=bag.backbone, weights_sha256=str(bag.attrs["weights_sha256"]),
              extra_attrs={k: bag.attrs[k] for k in ("feature_blocks", "embed_signature") if k in bag.attrs})
    before = set(tmp_path.rglob("*"))
    out = tmp_path / "explained"
    assert main(["explain", "--run", str(world.run), "--cohort", str(world.cohort), "--bags", str(bags),
                 "--out", str(out), "--patient", str(bag.patient_id), *QUIET]) == 0
    created = set(tmp_path.rglob("*")) - before
    assert created and all(p.is_relative_to(out) for p in created), sorted(created)
    for escaped in (tmp_path / "escaped.png", tmp_path.parent / "escaped.png", Path("/tmp/absolute.png")):
        assert not escaped.exists()
    assert {p.name for p in (out / str(bag.patient_id)).iterdir()} >= {"cell_scores.csv", "report.html"}
    assert "../../escaped.png" in (out / str(bag.patient_id) / "cell_scores.csv").read_text()
