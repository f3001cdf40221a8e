"""Write a simulated cohort: manifest, one folder of single-cell crops per slide, per-cell truth.

Layout of ``out``::

    patients.csv  slides.csv  synth.json  (patients.csv: label, age, sex, CBC, follow-up time/event)
    slides/<slide_id>/<cell_id>.png      RGB crops (CellaVision-style export)
    slides/<slide_id>/cells.csv          truth: cell_id, cell_type, diagnostic, then 0/1 per anomaly attribute

or, with ``wsi=True``, one scanned smear per slide::

    slides/<slide_id>.tiff               pyramidal tiled JPEG TIFF, mpp in the resolution tags
    slides/<slide_id>.cells.csv          truth: cell_id, x, y, x0, y0, x1, y1 (level-0 px), cell_type, diagnostic,
                                         then 0/1 per anomaly attribute (vacuoles, hypogranular, pseudo_pelger, auer_rod)

or, with ``fields=True``, one folder of photographed fields per slide (``kind = fields``)::

    slides/<slide_id>/field_NNN.jpg          one field of view (PNG when the profile writes no JPEG)
    slides/<slide_id>/field_NNN.cells.csv    its truth, as a scan's, in pixels of the field

``acquisition`` names a profile of :mod:`milhema.synth.acquisition` (stain family, lamp, blur,
vignetting, pixel size, JPEG); the default profile writes what the simulator always wrote.

Every random draw comes from a generator seeded by (seed, patient, slide), so the same seed
gives a byte-identical cohort whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from milhema.errors import MilhemaError
from milhema.io import atomic_folder, write_csv, write_text
from milhema.slides.wsi import TRUTH_SUFFIX
from milhema.synth.acquisition import (
    DEFAULT_PROFILE,
    MIXED_PROFILE,
    PROFILE_NAMES,
    AcquisitionProfile,
    Illumination,
    get_profile,
    slide_look,
    slide_profile,
)
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
from milhema.synth.smear import TRUTH_HEADER, cell_rng, default_size, plan_smear, write_field, write_smear
from milhema.synth.stain import Stain
from milhema.version import __version__

DIAGNOSES = ("AML", "MDS", "VEXAS", "reactive")
_AGE = {"AML": (65.0, 14.0), "MDS": (73.0, 9.0), "VEXAS": (68.0, 8.0), "reactive": (52.0, 19.0)}
_MALE = {"AML": 0.55, "MDS": 0.6, "VEXAS": 0.96, "reactive": 0.5}
_STAIN_STRENGTH = {"easy": 0.5, "default": 1.0, "hard": 1.4}
_PATIENT_STREAM, _SLIDE_STREAM, _OUTCOME_STREAM, _MIX_STREAM = 1, 2, 3, 4
# Streams below a slide's seed: the profile's per-slide draws, and the fields of a fields folder.
_ACQUISITION_STREAM, _FIELD_STREAM = 101, 102
_UM2_PER_CELL = 8000.0   # glass area per white cell on a simulated smear (as smear.default_size)


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
    acquisition: str = DEFAULT_PROFILE   # the slide's profile (``mixed`` resolved per slide)
    mpp: float | None = None       # µm per pixel; None = the default profile's (24 µm / crop_px, scans 0.25)
    fields: bool = False           # a folder of photographed fields instead of crops or a scan

    @property
    def slide_mpp(self) -> float:
        """µm per pixel of the slide's images."""
        if self.mpp is not None:
            return self.mpp
        return WSI_MPP if self.wsi_size is not None or self.fields else 24.0 / self.crop_px


WSI_MPP = 0.25   # µm per pixel of simulated scans (as a 40x slide scanner gives; docs/DOMAIN.md)


def synthesize_cohort(out: str | Path, n_patients: int = 40, seed: int = 0, difficulty: str = "default", *,
                      cells_per_slide: int | None = None, crop_px: int | None = None, missing_rate: float = 0.1,
                      wsi: bool = False, wsi_size: int | None = None, workers: int | None = None,
                      progress: bool = True, acquisition: str = DEFAULT_PROFILE, mpp: float | None = None,
                      fields: bool = False) -> Path:
    """Write a simulated cohort of ``n_patients`` patients into ``out`` and return it.

    Args:
        cells_per_slide: mean number of white cells per slide (each slide draws 0.6–1.4 times it);
            default 120 for crop folders, 300 for whole-slide scans and fields.
        crop_px: side of the square crops in pixels; a crop always spans 24 µm, so this sets the
            pixel size (24 / crop_px µm); default 96 px, or 24 µm at the profile's or ``mpp``'s pixel size.
        wsi: write each slide as a scanned smear (pyramidal TIFF, 0.25 µm/px by default) instead of crops.
        wsi_size: side of each scan in px (default: room for the slide's cells at a typical density).
        workers: processes rendering slides in parallel (default: the number of CPUs, at most 8).
        acquisition: an acquisition profile (:data:`~milhema.synth.acquisition.PROFILE_NAMES`); the
            default writes what the simulator always wrote, ``mixed`` draws a named profile per slide.
        mpp: µm per pixel of every slide, instead of the profile's (0.05-2).
        fields: write each slide as a folder of photographed fields (``kind = fields``; fields of the
            profile's camera size, in JPEG at its quality) instead of crops.

    Raises:
        MilhemaError: ``out`` exists and is not empty, or a parameter is out of range.
    """
    out = Path(out)
    if difficulty not in DIFFICULTIES:
        raise MilhemaError(f"--difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    if acquisition not in PROFILE_NAMES:
        raise MilhemaError(f"--acquisition must be one of {', '.join(PROFILE_NAMES)}, got {acquisition!r}")
    if n_patients < 1:
        raise MilhemaError(f"--patients must be at least 1, got {n_patients}")
    if mpp is not None and not 0.05 <= mpp <= 2.0:
        raise MilhemaError(f"--mpp must be between 0.05 and 2 µm per pixel, got {mpp:g}")
    if mpp is not None and crop_px is not None:
        raise MilhemaError("give --mpp or --crop-px, not both: a crop spans 24 µm, so either sets the other")
    if wsi and fields:
        raise MilhemaError("give --wsi or --fields, not both: a slide is one scan or a folder of fields")
    if cells_per_slide is None:
        cells_per_slide = 300 if wsi or fields else 120
    if cells_per_slide < 1 or (crop_px is not None and crop_px < 32):
        raise MilhemaError("cells per slide must be ≥ 1 and crop size ≥ 32 px")
    if wsi_size is not None and wsi_size < 512:
        raise MilhemaError(f"--wsi-size must be at least 512 px, got {wsi_size}")
    patients, jobs = _plan(n_patients, seed, difficulty, cells_per_slide, crop_px or 96, missing_rate)
    if acquisition != DEFAULT_PROFILE or mpp is not None:
        jobs = [_with_profile(j, acquisition, seed, mpp, crop_px) for j in jobs]
    if wsi:
        jobs = [replace(j, wsi_size=wsi_size or 0) for j in jobs]
    if fields:
        jobs = [replace(j, fields=True) for j in jobs]
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
        crop_side = crop_px or 96
        params: dict[str, object] = {
            "generator": f"milhema {__version__}", "seed": seed, "patients": n_patients,
            "difficulty": difficulty, "cells_per_slide": cells_per_slide, "crop_px": crop_side,
            "crop_um": 24.0, "mpp": WSI_MPP if wsi else 24.0 / crop_side, "missing_rate": missing_rate,
            "wsi": wsi, "wsi_size": wsi_size,
        }
        if acquisition != DEFAULT_PROFILE or mpp is not None or fields:
            # Only then: a cohort of the default profile keeps the synth.json it always had.
            names = sorted({j.acquisition for j in jobs})
            params |= {"crop_px": None if len({j.crop_px for j in jobs}) > 1 else jobs[0].crop_px,
                       "mpp": mpp if mpp is not None else (jobs[0].slide_mpp if len(names) == 1 else None),
                       "fields": fields, "acquisition": acquisition,
                       "profiles": {name: asdict(get_profile(name)) for name in names}}
            if acquisition == MIXED_PROFILE:
                params["slide_profiles"] = {j.slide_id: j.acquisition for j in jobs}
        write_text(tmp / "synth.json", json.dumps(params, indent=2) + "\n")
    return out


def _with_profile(job: SlideJob, acquisition: str, seed: int, mpp: float | None, crop_px: int | None) -> SlideJob:
    """The job of a slide of ``acquisition`` (``mixed``: a profile drawn for this slide from its own
    stream, so the patients and cells are those of the default profile) at the pixel size asked for."""
    rng = np.random.default_rng([seed, _MIX_STREAM, *job.seed[2:]])
    profile = slide_profile(acquisition, rng)
    if mpp is None and crop_px is None and profile.name != DEFAULT_PROFILE:
        mpp = profile.mpp
    if crop_px is not None:
        mpp = 24.0 / crop_px
    side = crop_px or (max(32, round(24.0 / mpp)) if mpp is not None else job.crop_px)
    return replace(job, acquisition=profile.name, mpp=mpp, crop_px=side)


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
    profile = get_profile(job.acquisition)
    acq_rng = np.random.default_rng([*job.seed, _ACQUISITION_STREAM])
    stain, light = slide_look(profile, rng, job.stain_strength, acq_rng, job.slide_mpp)
    cells = slide_cells(job.state, np.asarray(job.differential), job.n_cells, job.view, rng)
    if job.wsi_size is not None:
        return _render_scan(job, root, stain, light, cells, profile)
    if job.fields:
        return _render_fields(job, root, stain, light, cells, profile, acq_rng)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    suffix = ".jpg" if profile.jpeg_quality else ".png"
    for i, (cell_type, diagnostic) in enumerate(cells):
        attributes = cell_attributes(cell_type, rng)   # before rendering: what the next draws will show
        if job.mpp is None:   # the default profile, exactly as before profiles existed
            rgb, _ = render_crop(cell_type, rng, stain, size=job.crop_px)
        else:
            rgb, _ = render_crop(cell_type, rng, stain, size=job.crop_px, mpp=job.mpp,
                                 light=_crop_light(light, profile, job.crop_px, acq_rng))
        cell_id = f"cell_{i:04d}{suffix}"
        if profile.jpeg_quality:
            Image.fromarray(rgb).save(folder / cell_id, format="JPEG", quality=profile.jpeg_quality)
        else:
            Image.fromarray(rgb).save(folder / cell_id, format="PNG", compress_level=6)
        rows.append((cell_id, cell_type, int(diagnostic), *attributes))
    write_csv(folder / "cells.csv", ["cell_id", "cell_type", "diagnostic", *CELL_ATTRIBUTES], rows)
    return len(cells)


def _crop_light(light: Illumination | None, profile: AcquisitionProfile, size: int,
                rng: np.random.Generator) -> np.ndarray | None:
    """The light over one crop: the lamp, and with vignetting the part of a camera field the crop was
    cut from (a position drawn anywhere in a field of the profile's size)."""
    if light is None:
        return None
    if not light.vignetting:
        return np.asarray(light.lamp, np.float32)
    width, height = profile.field_px
    x = rng.uniform(0.0, max(width - size, 0))
    y = rng.uniform(0.0, max(height - size, 0))
    return light.gain(x, y, size, size, (width, height), (width / 2.0, height / 2.0))


def _render_scan(job: SlideJob, root: Path, stain: Stain, light: Illumination | None,
                 cells: Sequence[tuple[str, bool]], profile: AcquisitionProfile) -> int:
    mpp = job.slide_mpp
    size = job.wsi_size or default_size(len(cells), mpp)
    try:
        spec = plan_smear(cells, size, size, mpp, job.seed, stain)
    except ValueError as exc:
        raise MilhemaError(f"slide {job.slide_id}: {exc} (--wsi-size {size})") from None
    if light is not None:
        # A scanner corrects its camera's shading (flat field): tint and level, no vignetting.
        spec = replace(spec, light=replace(light, vignetting=0.0))
    (root / "slides").mkdir(parents=True, exist_ok=True)
    quality = profile.jpeg_quality or 90
    rows = write_smear(root / "slides" / f"{job.slide_id}.tiff", spec, jpeg_quality=quality)
    rows = [(*row, *cell_attributes(cell.cell_type, cell_rng(spec, i))) for i, (row, cell) in
            enumerate(zip(rows, spec.cells, strict=True))]
    write_csv(root / "slides" / f"{job.slide_id}{TRUTH_SUFFIX}", [*TRUTH_HEADER, *CELL_ATTRIBUTES], rows)
    return len(cells)


def _render_fields(job: SlideJob, root: Path, stain: Stain, light: Illumination | None,
                   cells: Sequence[tuple[str, bool]], profile: AcquisitionProfile, rng: np.random.Generator) -> int:
    """A folder of field photographs holding the slide's cells, each field at the profile's camera
    size with as many cells as fit at a smear's density (at least one), its optical axis a little off
    the image centre."""
    mpp = job.slide_mpp
    width, height = profile.field_px
    per_field = max(1, int(0.6 * width * height * mpp * mpp / _UM2_PER_CELL))
    folder = root / "slides" / job.slide_id
    folder.mkdir(parents=True, exist_ok=True)
    ext = "jpg" if profile.jpeg_quality else "png"
    for k, start in enumerate(range(0, len(cells), per_field)):
        try:
            spec = plan_smear(cells[start:start + per_field], width, height, mpp,
                              (*job.seed, _FIELD_STREAM, k), stain)
        except ValueError as exc:
            raise MilhemaError(f"slide {job.slide_id}: {exc} (a field of {width}×{height} px at {mpp:g} µm/px)") from None
        axis = (width / 2.0 + rng.normal(0.0, 0.05 * width), height / 2.0 + rng.normal(0.0, 0.05 * height))
        spec = replace(spec, light=light, axis=axis)
        rows = write_field(folder / f"field_{k:03d}.{ext}", spec, jpeg_quality=profile.jpeg_quality)
        rows = [(*row, *cell_attributes(cell.cell_type, cell_rng(spec, i))) for i, (row, cell) in
                enumerate(zip(rows, spec.cells, strict=True))]
        write_csv(folder / f"field_{k:03d}{TRUTH_SUFFIX}", [*TRUTH_HEADER, *CELL_ATTRIBUTES], rows)
    return len(cells)


def _write_manifest(root: Path, patients: list[dict[str, object]], jobs: Sequence[SlideJob]) -> None:
    columns = ["patient_id", "label", "age", "sex", *CBC_COLUMNS, "time", "event"]
    write_csv(root / "patients.csv", columns, [[_fmt(p[c]) for c in columns] for p in patients])
    # Scans carry their mpp in the TIFF; crop folders and fields need it in the manifest.
    if any(j.fields for j in jobs):
        write_csv(root / "slides.csv", ["slide_id", "patient_id", "source", "kind", "view", "mpp"],
                  [[j.slide_id, j.slide_id.rsplit("_S", 1)[0], f"slides/{j.slide_id}", "fields", j.view,
                    f"{j.slide_mpp:.4f}"] for j in jobs])
        return
    write_csv(root / "slides.csv", ["slide_id", "patient_id", "source", "view", "mpp"],
              [[j.slide_id, j.slide_id.rsplit("_S", 1)[0],
                f"slides/{j.slide_id}" + (".tiff" if j.wsi_size is not None else ""), j.view,
                "" if j.wsi_size is not None else f"{j.slide_mpp:.4f}"] for j in jobs])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:g}"
    return str(value)
