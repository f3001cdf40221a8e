"""Write a simulated cohort: manifest, one folder of single-cell crops per slide, per-cell truth.

Layout of ``out``::

    patients.csv  slides.csv  synth.json  (patients.csv: label, age, sex, CBC, follow-up time/event)
    slides/<slide_id>/<cell_id>.png      RGB crops (CellaVision-style export)
    slides/<slide_id>/cells.csv          truth: cell_id, cell_type, diagnostic, then 0/1 per anomaly attribute

or, with ``wsi=True``, one scanned smear per slide::

    slides/<slide_id>.tiff               pyramidal tiled JPEG TIFF, mpp in the resolution tags
    slides/<slide_id>.cells.csv          truth: cell_id, x, y, x0, y0, x1, y1 (level-0 px), cell_type, diagnostic,
                                         then 0/1 per anomaly attribute (vacuoles, hypogranular, pseudo_pelger, auer_rod)

Every random draw comes from a generator seeded by (seed, patient, slide), so the same seed
gives a byte-identical cohort whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from milhema.errors import MilhemaError
from milhema.io import atomic_folder, write_csv, write_text
from milhema.slides.wsi import TRUTH_SUFFIX
from milhema.synth.cbc import CBC_COLUMNS, sample_cbc
from milhema.synth.cells import CELL_ATTRIBUTES, cell_attributes
from milhema.synth.composition import (
    DIFFICULTIES,
    DiseaseState,
    blood_blast_fraction,
    sample_disease,
    slide_cells,
)
from milhema.synth.crop import render_crop
from milhema.synth.outcome import sample_follow_up
from milhema.synth.smear import TRUTH_HEADER, cell_rng, default_size, plan_smear, write_smear
from milhema.synth.stain import Stain
from milhema.version import __version__

DIAGNOSES = ("AML", "MDS", "VEXAS", "reactive")
_AGE = {"AML": (65.0, 14.0), "MDS": (73.0, 9.0), "VEXAS": (68.0, 8.0), "reactive": (52.0, 19.0)}
_MALE = {"AML": 0.55, "MDS": 0.6, "VEXAS": 0.96, "reactive": 0.5}
_STAIN_STRENGTH = {"easy": 0.5, "default": 1.0, "hard": 1.4}
_PATIENT_STREAM, _SLIDE_STREAM, _OUTCOME_STREAM = 1, 2, 3


@dataclass(frozen=True)
class SlideJob:
    slide_id: str
    view: str
    n_cells: int
    seed: tuple[int, ...]
    state: DiseaseState
    differential: tuple[float, ...]
    crop_px: int
    stain_strength: float
    wsi_size: int | None = None   # side of a whole-slide scan in px; None = crop folder


WSI_MPP = 0.25   # µm per pixel of simulated scans (as a 40x slide scanner gives; docs/DOMAIN.md)


def synthesize_cohort(out: str | Path, n_patients: int = 40, seed: int = 0, difficulty: str = "default", *,
                      cells_per_slide: int | None = None, crop_px: int = 96, missing_rate: float = 0.1,
                      wsi: bool = False, wsi_size: int | None = None, workers: int | None = None,
                      progress: bool = True) -> Path:
    """Write a simulated cohort of ``n_patients`` patients into ``out`` and return it.

    Args:
        cells_per_slide: mean number of white cells per slide (each slide draws 0.6–1.4 times it);
            default 120 for crop folders, 300 for whole-slide scans.
        crop_px: side of the square crops in pixels; a crop always spans 24 µm.
        wsi: write each slide as a scanned smear (pyramidal TIFF at 0.25 µm/px) instead of crops.
        wsi_size: side of each scan in px (default: room for the slide's cells at a typical density).
        workers: processes rendering slides in parallel (default: the number of CPUs, at most 8).

    Raises:
        MilhemaError: ``out`` exists and is not empty, or a parameter is out of range.
    """
    out = Path(out)
    if difficulty not in DIFFICULTIES:
        raise MilhemaError(f"--difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    if n_patients < 1:
        raise MilhemaError(f"--patients must be at least 1, got {n_patients}")
    if cells_per_slide is None:
        cells_per_slide = 300 if wsi else 120
    if cells_per_slide < 1 or crop_px < 32:
        raise MilhemaError("cells per slide must be ≥ 1 and crop size ≥ 32 px")
    if wsi_size is not None and wsi_size < 512:
        raise MilhemaError(f"--wsi-size must be at least 512 px, got {wsi_size}")
    patients, jobs = _plan(n_patients, seed, difficulty, cells_per_slide, crop_px, missing_rate)
    if wsi:
        jobs = [replace(j, wsi_size=wsi_size or 0) for j in jobs]
    # Rendered into a temporary sibling folder and renamed at the end: no half cohort under `out`.
    with atomic_folder(out, what="cohort folder", hint="choose a new folder or delete it") as tmp:
        n_workers = max(1, min(workers or os.cpu_count() or 1, 8, len(jobs)))
        bar = tqdm(total=sum(j.n_cells for j in jobs), desc="synth", unit="cell", disable=None if progress else True)
        if n_workers == 1:
            for job in jobs:
                bar.update(_render_slide(job, tmp))
        else:
            with ProcessPoolExecutor(n_workers) as pool:
                for done in pool.map(_render_slide, jobs, [tmp] * len(jobs)):
                    bar.update(done)
        bar.close()
        _write_manifest(tmp, patients, jobs)
        write_text(tmp / "synth.json", json.dumps({
            "generator": f"milhema {__version__}", "seed": seed, "patients": n_patients,
            "difficulty": difficulty, "cells_per_slide": cells_per_slide, "crop_px": crop_px,
            "crop_um": 24.0, "mpp": WSI_MPP if wsi else 24.0 / crop_px, "missing_rate": missing_rate,
            "wsi": wsi, "wsi_size": wsi_size,
        }, indent=2) + "\n")
    return out


def _plan(n_patients: int, seed: int, difficulty: str, cells_per_slide: int, crop_px: int,
          missing_rate: float) -> tuple[list[dict[str, object]], list[SlideJob]]:
    """Draw every patient (diagnosis, demographics, CBC, disease state) and their slides."""
    order = np.random.default_rng([seed, 0]).permutation(n_patients)
    diagnoses = [DIAGNOSES[i % len(DIAGNOSES)] for i in order]  # balanced classes
    patients: list[dict[str, object]] = []
    jobs: list[SlideJob] = []
    for index, diagnosis in enumerate(diagnoses):
        rng = np.random.default_rng([seed, _PATIENT_STREAM, index])
        pid = f"P{index + 1:04d}"
        state = sample_disease(diagnosis, difficulty, rng)
        cbc, differential = sample_cbc(diagnosis, rng, blood_blast_fraction(state), missing_rate)
        mean_age, sd_age = _AGE[diagnosis]
        # Follow-up from its own stream: adding it left every other draw (and image) unchanged.
        time, event = sample_follow_up(state, cbc, np.random.default_rng([seed, _OUTCOME_STREAM, index]))
        patients.append({"patient_id": pid, "label": diagnosis,
                         "age": int(np.clip(round(rng.normal(mean_age, sd_age)), 18, 98)),
                         "sex": "M" if rng.random() < _MALE[diagnosis] else "F", **cbc,
                         "time": time, "event": event})
        n_slides = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        for s in range(n_slides):
            view = "PB" if s == 0 or rng.random() < 0.5 else "BM"
            n_cells = max(1, int(round(cells_per_slide * rng.uniform(0.6, 1.4))))
            sid = f"{pid}_S{s + 1}"
            jobs.append(SlideJob(slide_id=sid, view=view, n_cells=n_cells,
                                 seed=(seed, _SLIDE_STREAM, index, s), state=state,
                                 differential=tuple(float(x) for x in differential), crop_px=crop_px,
                                 stain_strength=_STAIN_STRENGTH[difficulty]))
    return patients, jobs


def _render_slide(job: SlideJob, root: Path) -> int:
    folder = root / "slides" / job.slide_id
    rng = np.random.default_rng(list(job.seed))
    stain = Stain.random(rng, strength=job.stain_strength)
    cells = slide_cells(job.state, np.asarray(job.differential), job.n_cells, job.view, rng)
    if job.wsi_size is not None:
        return _render_scan(job, root, stain, cells)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (cell_type, diagnostic) in enumerate(cells):
        attributes = cell_attributes(cell_type, rng)   # before rendering: what the next draws will show
        rgb, _ = render_crop(cell_type, rng, stain, size=job.crop_px)
        cell_id = f"cell_{i:04d}.png"
        Image.fromarray(rgb).save(folder / cell_id, format="PNG", compress_level=6)
        rows.append((cell_id, cell_type, int(diagnostic), *attributes))
    write_csv(folder / "cells.csv", ["cell_id", "cell_type", "diagnostic", *CELL_ATTRIBUTES], rows)
    return len(cells)


def _render_scan(job: SlideJob, root: Path, stain: Stain, cells: Sequence[tuple[str, bool]]) -> int:
    size = job.wsi_size or default_size(len(cells), WSI_MPP)
    try:
        spec = plan_smear(cells, size, size, WSI_MPP, job.seed, stain)
    except ValueError as exc:
        raise MilhemaError(f"slide {job.slide_id}: {exc} (--wsi-size {size})") from None
    (root / "slides").mkdir(parents=True, exist_ok=True)
    rows = write_smear(root / "slides" / f"{job.slide_id}.tiff", spec)
    rows = [(*row, *cell_attributes(cell.cell_type, cell_rng(spec, i))) for i, (row, cell) in
            enumerate(zip(rows, spec.cells, strict=True))]
    write_csv(root / "slides" / f"{job.slide_id}{TRUTH_SUFFIX}", [*TRUTH_HEADER, *CELL_ATTRIBUTES], rows)
    return len(cells)


def _write_manifest(root: Path, patients: list[dict[str, object]], jobs: Sequence[SlideJob]) -> None:
    columns = ["patient_id", "label", "age", "sex", *CBC_COLUMNS, "time", "event"]
    write_csv(root / "patients.csv", columns, [[_fmt(p[c]) for c in columns] for p in patients])
    # Scans carry their mpp in the TIFF; crop folders need it in the manifest.
    write_csv(root / "slides.csv", ["slide_id", "patient_id", "source", "view", "mpp"],
              [[j.slide_id, j.slide_id.rsplit("_S", 1)[0],
                f"slides/{j.slide_id}" + (".tiff" if j.wsi_size is not None else ""), j.view,
                "" if j.wsi_size is not None else f"{24.0 / j.crop_px:.4f}"] for j in jobs])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:g}"
    return str(value)
