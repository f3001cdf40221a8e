"""Embed every cell of a cohort once into one bag file per slide.

Scanned smears and folders of photographed fields are first searched for white cells by the
chosen detector (:mod:`milhema.slides.detectors`, cached under ``<out>/detections/``); crop
folders are listed. Then one DataLoader streams the cells of all
pending slides in order: workers decode crop files or cut ``crop_um`` squares out of the scans,
optionally normalise their stain (:mod:`milhema.embed.stain`), resize them (and compute morphology
features), the main process normalises and runs the frozen backbone in batches, and a background thread writes each bag as soon as its last cell is
embedded. Finished bags made with the same backbone are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from milhema.bags import validate_bag, write_bag
from milhema.data.manifest import Cohort, Slide
from milhema.device import resolve_device
from milhema.embed.backbone import DEFAULT_BACKBONE, NO_BACKBONE, Backbone, load_backbone
from milhema.embed.morphology import MORPHOLOGY_FEATURES, MORPHOLOGY_VERSION, morphology_features
from milhema.embed.stain import (
    REFERENCE_FILE,
    STAIN_METHODS,
    SlideNormaliser,
    StainReference,
    fit_reference,
    load_reference,
    sample_indices,
)
from milhema.errors import BagError, BagSettingsError, EmbedError, MilhemaError
from milhema.io import write_text
from milhema.slides.calibrate import Calibration, calibrate
from milhema.slides.crops import IMAGE_SUFFIXES, CropFolder, check_crop_folder
from milhema.slides.detect import DetectOptions
from milhema.slides.detectors import DEFAULT_DETECTOR, get_detector
from milhema.slides.source import CellSource, detection_signature, open_source

log = logging.getLogger(__name__)
THUMBNAIL_PX = 64
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}


@dataclass
class EmbedOptions:
    """What ``milhema embed`` does; the defaults are the CLI's."""

    backbone: str = DEFAULT_BACKBONE
    weights: Path | None = None
    pretrained: bool = True
    morphology: bool = False
    input_size: int | None = None
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    fail_on_bad_image: bool = False
    amp: bool = True
    progress: bool = True
    crop_um: float = 24.0            # side of a cell crop cut from a scan or field, in µm
    detector: str = DEFAULT_DETECTOR  # a name of milhema.slides.detectors.list_detectors()
    stain_normalize: str = "none"     # none, macenko or reinhard (milhema.embed.stain)
    stain_reference: Path | None = None   # stain_reference.json of an earlier embed, or an image; None: fit
                                          # on this cohort (or reuse <out>/stain_reference.json)


@dataclass
class EmbedReport:
    """What a run did. ``cells_per_s`` counts embedded cells over the embedding wall time."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    detections: list[str] = field(default_factory=list)   # one QC line per scanned slide or fields folder
    bad_images: int = 0
    first_bad_image: str = ""
    cells: int = 0
    seconds: float = 0.0
    too_deep: int = 0                                             # files skipped below cell-type folders
    not_in_truth: dict[str, int] = field(default_factory=dict)    # slide -> images without a cells.csv row
    truth_orphans: dict[str, int] = field(default_factory=dict)   # slide -> cells.csv rows without an image

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if not self.written:
            return f"all {len(self.skipped)} bags were already embedded with these settings; nothing to do"
        text = (f"embedded {self.cells} cells of {len(self.written)} slides in {self.seconds:.1f} s "
                f"({self.cells_per_s:.0f} cells/s); {len(self.skipped)} finished bags kept")
        if self.empty:
            text += (f"; {len(self.empty)} slide{'s' if len(self.empty) > 1 else ''} without cells: "
                     f"{', '.join(self.empty[:5])}")
        if self.bad_images:
            text += f"; {self.bad_images} unreadable image{'s' if self.bad_images > 1 else ''} skipped"
        if self.too_deep:
            text += f"; {self.too_deep} file{'s' if self.too_deep > 1 else ''} more than one folder deep skipped"
        if self.not_in_truth:
            text += f"; {_count(self.not_in_truth, 'image')} without a cells.csv row ({_which(self.not_in_truth)})"
        if self.truth_orphans:
            text += f"; {_count(self.truth_orphans, 'cells.csv row')} naming no image ({_which(self.truth_orphans)})"
        if self.detections:
            text = "\n".join([*self.detections, text])
        return text


def _count(counts: dict[str, int], what: str) -> str:
    """``"3 images"``: the total of a per-slide count."""
    total = sum(counts.values())
    return f"{total} {what}{'s' if total > 1 else ''}"


def _which(counts: dict[str, int]) -> str:
    """``"slide S1"`` / ``"2 slides: S1, S2"``: the slides a count of the summary comes from."""
    names = list(counts)
    if len(names) == 1:
        return f"slide {names[0]}"
    return f"{len(names)} slides: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``: this process embeds slides 2, 10, 18, ... (0-based, like SLURM arrays)."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise MilhemaError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise MilhemaError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def embed_cohort(cohort: Cohort, out: str | Path, options: EmbedOptions | None = None) -> EmbedReport:
    """Write ``out/<slide_id>.h5`` for every slide of this shard that has no valid bag yet."""
    opts = options or EmbedOptions()
    out = Path(out)
    embedded = [s.slide_id for s in cohort.slides if s.is_bag_file]
    if embedded:
        raise EmbedError(f"slide {embedded[0]}{f' and {len(embedded) - 1} more' if len(embedded) > 1 else ''}: "
                         "the source is a feature file, already embedded; train on the cohort as it is "
                         "(no milhema embed, no --bags)")
    get_detector(opts.detector)   # a misspelt --detector fails before the backbone loads
    if opts.stain_normalize not in STAIN_METHODS:
        raise EmbedError(f"--stain-normalize must be one of {', '.join(STAIN_METHODS)}, got {opts.stain_normalize!r}")
    if opts.stain_normalize == "none" and opts.stain_reference is not None:
        raise EmbedError("--stain-reference needs --stain-normalize macenko or reinhard")
    out.mkdir(parents=True, exist_ok=True)
    index, count = opts.shard
    slides = cohort.slides[index::count]
    detect = DetectOptions(workers=max(1, min(os.cpu_count() or 1, 8)), progress=opts.progress)
    reference = _stain_reference(cohort, out, opts, detect)
    backbone = _load(opts)
    report = EmbedReport()
    pending = []
    for slide in slides:
        _remove_stale_temporaries(out, slide.slide_id)
        signature = _signature(opts, backbone, slide, reference)
        if not opts.overwrite and _finished(out / f"{slide.slide_id}.h5", signature):
            report.skipped.append(slide.slide_id)
        else:
            pending.append(slide)
    if reference is not None:
        # Beside the bags: what they were normalised to (pass it as --stain-reference for a test cohort).
        write_text(out / REFERENCE_FILE, reference.to_json())
    if not pending:
        return report
    workers = opts.workers if opts.workers is not None else min(4, max(1, (os.cpu_count() or 2) // 2))
    sources = []
    for slide in pending:
        source = open_source(slide, out / "detections", opts.crop_um, opts.detector, detect)
        if source.qc:
            report.detections.append(source.qc)
            log.info(source.qc)
        sources.append(source)
    # Bags of other slides hold cells when some were skipped; a shard sees only its own slides.
    whole_cohort = count == 1 and not report.skipped
    if whole_cohort and not any(len(source) for source in sources):
        raise EmbedError(_nothing_found(sources))
    for source in sources:
        if source.crops is not None:
            _check_crops(source.crops, opts.fail_on_bad_image, report)
    _check_mpp(sources, opts.morphology)
    if opts.morphology:
        for source in sources:
            _calibrate_crops(source)
    normalisers = None if reference is None else [_slide_normaliser(reference, source) for source in sources]
    start = time.perf_counter()
    _run(out, pending, sources, backbone, opts, report, workers, reference, normalisers)
    report.seconds = time.perf_counter() - start
    if whole_cohort and report.cells == 0:
        # Every listed cell was unreadable: empty bags would pass for a finished embedding.
        for slide_id in report.written:
            (out / f"{slide_id}.h5").unlink(missing_ok=True)
        n = report.bad_images
        raise EmbedError(f"{_no_cell_in(sources)}: {'all ' if n > 1 else ''}{n} image{'s are' if n > 1 else ' is'} "
                         f"unreadable (first: {report.first_bad_image}); re-export them as PNG, JPEG, TIFF or BMP")
    return report


def _no_cell_in(sources: list[CellSource]) -> str:
    return f"no cell in any of the {len(sources)} slides" if len(sources) > 1 else f"no cell in slide {sources[0].slide_id}"


def _check_crops(crops: CropFolder, strict: bool, report: EmbedReport) -> None:
    check_crop_folder(crops, strict)
    report.too_deep += len(crops.too_deep)
    if crops.not_in_truth:
        report.not_in_truth[crops.slide_id] = len(crops.not_in_truth)
    if crops.truth_orphans:
        report.truth_orphans[crops.slide_id] = len(crops.truth_orphans)


def _nothing_found(sources: list[CellSource]) -> str:
    """What the sources of a cohort without a single cell hold instead, for the one-line error."""
    folders = [s.crops for s in sources if s.crops is not None]
    photographed = sum(s.field is not None for s in sources)
    scans = len(sources) - len(folders) - photographed
    found, fixes = [], []
    if folders:
        others = [name for crops in folders for name in crops.not_images]
        deep = [name for crops in folders for name in crops.too_deep]
        held = []
        if others:
            held.append(f"{len(others)} other file{'s' if len(others) > 1 else ''} (e.g. {others[0]!r})")
        if deep:
            held.append(f"{len(deep)} file{'s' if len(deep) > 1 else ''} more than one folder deep "
                        f"(e.g. {deep[0]!r})")
        what = f"only {' and '.join(held)}" if held else "nothing else"
        found.append(f"the {'crop folder holds' if len(folders) == 1 else f'{len(folders)} crop folders hold'} "
                     f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and {what}")
        fixes.append("put each slide's images in its folder or in one subfolder per cell type")
    imaged = ["the scan" if scans == 1 else f"the {scans} scans"] if scans else []
    imaged += [f"the fields of {photographed} slide{'s' if photographed > 1 else ''}"] if photographed else []
    if imaged:
        what = "scans" if not photographed else "fields" if not scans else "scans and fields"
        found.append(f"no white cell was detected in {' or '.join(imaged)}")
        fixes.append(f"check that the {what} are stained smears and that their microns per pixel are right "
                     "(the mpp column of slides.csv)")
    return f"{_no_cell_in(sources)}: {'; '.join(found)}; {', and '.join(fixes)}; check the sources in slides.csv"


def _load(opts: EmbedOptions) -> Backbone | None:
    if opts.backbone == NO_BACKBONE:
        if not opts.morphology:
            raise EmbedError("--backbone none needs --morphology (otherwise there are no features)")
        return None
    return load_backbone(opts.backbone, opts.weights, pretrained=opts.pretrained, input_size=opts.input_size)


def _signature(opts: EmbedOptions, backbone: Backbone | None, slide: Slide,
               reference: StainReference | None = None) -> str:
    """What a bag's features depend on; a scan's or fields folder's also on the crop size and the
    detector's signature (name, version, settings, input files: a change there is a new embedding);
    with stain normalisation, the method and the reference's hash (without it, nothing is added, so
    folders embedded before normalisation existed still resume)."""
    made: dict[str, object] = {
        "backbone": backbone.name if backbone else NO_BACKBONE,
        "weights_sha256": backbone.weights_sha256 if backbone else "none",
        "input_size": backbone.input_size if backbone else 0,
        "morphology": MORPHOLOGY_VERSION if opts.morphology else False,
    }
    if slide.source_kind != "crops":
        made |= {"crop_um": opts.crop_um, "detector": opts.detector,
                 "detect": detection_signature(slide, opts.detector, DetectOptions())}
    if reference is not None:
        made |= {"stain_normalize": reference.method, "stain_reference": reference.sha256}
    return json.dumps(made, sort_keys=True)


def _stain_of(signature: object) -> str:
    """``none`` or ``macenko (reference 0123456789ab)``: the normalisation an embed signature records."""
    try:
        made = json.loads(str(signature))
    except ValueError:
        return "none"
    method = made.get("stain_normalize", "none") if isinstance(made, dict) else "none"
    return method if method == "none" else f"{method} (reference {str(made.get('stain_reference'))[:12]})"


def _finished(path: Path, signature: str) -> bool:
    """A valid bag with cells made the same way; a bag made another way is an error, not silently mixed."""
    if not path.exists():
        return False
    try:
        attrs = validate_bag(path)
    except BagError as exc:
        log.warning("%s; embedding it again", exc)
        return False
    made_with = attrs.get("embed_signature")
    if made_with != signature:
        had, want = _stain_of(made_with), _stain_of(signature)
        if had != want:
            raise BagSettingsError(f"{path} was embedded with --stain-normalize {had}, not {want}; use --overwrite "
                                   "to redo it or another --out folder")
        raise BagSettingsError(f"{path} was embedded with other settings ({made_with}); use --overwrite to redo it "
                               "or another --out folder")
    # An empty bag costs nothing to redo, and its source may have been fixed since (images added,
    # a layout this version reads): it is listed again rather than kept.
    return int(attrs["n_cells"]) > 0


_REFERENCE_CELLS_PER_SLIDE = 8     # cells of each slide in a reference fitted on a cohort
_REFERENCE_SLIDES = 64             # at most this many slides (evenly spaced in slides.csv order)
_SLIDE_SAMPLE = 32                 # cells on which a slide's own stain parameters are fitted


def _stain_reference(cohort: Cohort, out: Path, opts: EmbedOptions, detect: DetectOptions) -> StainReference | None:
    """The reference of --stain-normalize: --stain-reference, else the one saved in ``out`` by an
    earlier run, else fitted on a sample of this cohort's cells (the whole cohort, whatever the shard)."""
    method = opts.stain_normalize
    if method == "none":
        return None
    if opts.stain_reference is not None:
        return load_reference(opts.stain_reference, method)
    saved = out / REFERENCE_FILE
    if saved.is_file() and not opts.overwrite:
        try:
            had = str(json.loads(saved.read_text(encoding="utf-8"))["method"])
        except (OSError, ValueError, KeyError, TypeError):
            had = method   # unreadable: load_reference names the problem
        if had != method:
            raise EmbedError(f"{out} holds bags normalised with --stain-normalize {had} ({REFERENCE_FILE}), not "
                             f"{method}; use --overwrite to redo them or another --out folder")
        return load_reference(saved, method)
    if opts.shard[1] > 1:
        raise EmbedError("--stain-normalize with --shard needs its reference first: pass --stain-reference FILE "
                         "(the stain_reference.json of an embedding of the training cohort, or an image)")
    slides = cohort.slides
    if len(slides) > _REFERENCE_SLIDES:
        slides = [slides[int(i)] for i in np.linspace(0, len(slides) - 1, _REFERENCE_SLIDES).round()]
    crops: list[np.ndarray] = []
    for slide in slides:
        source = open_source(slide, out / "detections", opts.crop_um, opts.detector, detect)
        crops += _sample(source, _REFERENCE_CELLS_PER_SLIDE, 0)
        source.close()
    where = f"cohort {cohort.root.name}: {len(crops)} cells of {len(slides)} slides"
    return fit_reference(method, crops, where)


def _sample(source: CellSource, k: int, stream: int) -> list[np.ndarray]:
    """Up to ``k`` readable cells of a slide, drawn by a generator keyed by the slide id (so a slide
    gets the same sample in any cohort and any run)."""
    key = int(hashlib.sha256(source.slide_id.encode()).hexdigest()[:12], 16)
    out = []
    for i in sample_indices(len(source), k, (stream, key)):
        try:
            out.append(source.read(i))
        except MilhemaError:
            continue
    return out


def _calibrate_crops(source: CellSource) -> None:
    """A crop folder's calibration (white point, stains) from a sample of its crops, for the morphology.

    One crop holds little glass, and its own white point moves by several grey levels from crop to
    crop (a 96 px crop crowded with red cells reads its glass darker): the cells of one slide are
    measured against one white, as a scan's are against its detector's calibration.
    """
    if source.crops is None or source.calibration is not None or not len(source) or not source.mpp:
        return
    sample = _sample(source, _SLIDE_SAMPLE, 2)
    if sample:
        source.calibration = calibrate(sample, source.mpp, flat_field=False).to_dict()


def _slide_normaliser(reference: StainReference, source: CellSource) -> SlideNormaliser:
    """The slide's own stain parameters, fitted on a sample of its cells (reference ones if it has none)."""
    sample = _sample(source, _SLIDE_SAMPLE, 1)
    try:
        return SlideNormaliser(reference, sample)
    except EmbedError as exc:
        raise EmbedError(f"slide {source.slide_id}: {exc}") from None


def _remove_stale_temporaries(out: Path, slide_id: str) -> None:
    for tmp in out.glob(f".{slide_id}.h5.*.tmp"):
        tmp.unlink(missing_ok=True)


def _check_mpp(sources: list[CellSource], morphology: bool) -> None:
    if not morphology:
        return
    for source in sources:
        if source.mpp is None:
            raise EmbedError(f"slide {source.slide_id}: --morphology measures in µm and needs the slide's "
                             "microns per pixel; add an 'mpp' column to slides.csv")


class _CellImages(Dataset):
    """Item i -> decoded, resized crop of cell i of the flattened cohort (runs in loader workers).

    Scans are opened lazily once per worker process (a :class:`WholeSlide` reopens after pickling).
    """

    def __init__(self, items: list[tuple[int, int]], sources: list[CellSource], input_size: int,
                 filter_name: str, morphology: bool, normalisers: list[SlideNormaliser] | None = None) -> None:
        self.items = items
        self.sources = sources
        self.input_size = input_size
        self.resample = _FILTERS.get(filter_name, Image.Resampling.BICUBIC)
        self.morphology = morphology
        self.normalisers = normalisers

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, object]:
        slide_index, cell = self.items[i]
        source = self.sources[slide_index]
        size = self.input_size
        n_morph = len(MORPHOLOGY_FEATURES) if self.morphology else 0
        try:
            rgb = source.read(cell)
        except MilhemaError as exc:
            side = size or 1  # the same shape as a readable cell's, so the batch can be stacked
            return {"slide": slide_index, "ok": False, "error": str(exc), "crop_px": 0,
                    "image": torch.zeros(3, side, side, dtype=torch.uint8),
                    "thumb": torch.zeros(THUMBNAIL_PX, THUMBNAIL_PX, 3, dtype=torch.uint8),
                    "morph": torch.zeros(n_morph)}
        # The thumbnail shows the cell as it is; the backbone sees it normalised; the morphology
        # segments it as it is and reads its colours normalised.
        thumb = np.array(Image.fromarray(rgb).resize((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BILINEAR,
                                                     reducing_gap=2.0))
        shown = rgb if self.normalisers is None else self.normalisers[slide_index](rgb)
        image = Image.fromarray(shown)
        resized = np.array(image.resize((size, size), self.resample)) if size else shown[:1, :1].copy()
        mpp = source.mpp if source.mpp is not None else math.nan
        # A crop cut from a scan is measured against the slide's white point, not its own.
        cal = Calibration.from_dict(source.calibration) if source.calibration else None
        colours = None if self.normalisers is None else shown
        morph = morphology_features(rgb, mpp, cal, colours) if self.morphology else np.zeros(0, np.float32)
        return {"slide": slide_index, "ok": True, "error": "", "crop_px": int(rgb.shape[0]),
                "image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))),
                "thumb": torch.from_numpy(thumb), "morph": torch.from_numpy(morph)}


@dataclass
class _SlideBuffer:
    slide: Slide
    source: CellSource
    features: list[np.ndarray] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    ok: list[np.ndarray] = field(default_factory=list)
    crop_px: int = 0
    seen: int = 0


def _run(out: Path, slides: list[Slide], sources: list[CellSource], backbone: Backbone | None,
         opts: EmbedOptions, report: EmbedReport, workers: int, reference: StainReference | None = None,
         normalisers: list[SlideNormaliser] | None = None) -> None:
    device = resolve_device(opts.device)
    items = [(i, cell) for i, src in enumerate(sources) for cell in range(len(src))]
    for src in sources:
        # Forked loader workers would share an open file's offset; each opens its own instead.
        src.close()
    input_size = backbone.input_size if backbone else 0
    dataset = _CellImages(items, sources, input_size, backbone.interpolation if backbone else "bilinear",
                          opts.morphology, normalisers)
    loader = DataLoader(dataset, batch_size=opts.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if workers > 0 else None)
    model = None
    if backbone is not None:
        model = backbone.model.to(device).to(memory_format=torch.channels_last)
        mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255.0
    buffers = [_SlideBuffer(slide, src) for slide, src in zip(slides, sources, strict=True)]
    use_amp = opts.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    writer = ThreadPoolExecutor(max_workers=1)  # overlaps HDF5 writes with the next batches
    pending_writes: list[Future[None]] = []
    next_to_flush = 0

    def flush_ready(upto: int) -> None:
        nonlocal next_to_flush
        while next_to_flush < upto:
            buf = buffers[next_to_flush]
            pending_writes.append(writer.submit(_write, out, buf, backbone, opts, report, reference))
            next_to_flush += 1

    bar = tqdm(total=len(items), desc="embed", unit="cell", disable=None if opts.progress else True, smoothing=0.1)
    try:
        with torch.inference_mode():
            for batch in loader:
                ok = batch["ok"].numpy()
                if not ok.all():
                    for message in (m for m, good in zip(batch["error"], ok, strict=True) if not good):
                        if opts.fail_on_bad_image:
                            raise EmbedError(message)
                        log.warning("%s; skipped", message)
                        report.first_bad_image = report.first_bad_image or message
                    report.bad_images += int((~ok).sum())
                parts = []
                if model is not None:
                    images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    images = (images.float() - mean) / std
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        parts.append(model(images).float().cpu().numpy())
                if opts.morphology:
                    parts.append(batch["morph"].numpy())
                features = np.concatenate(parts, axis=1)
                slide_idx = batch["slide"].numpy()
                for s in np.unique(slide_idx):
                    sel = slide_idx == s
                    buf = buffers[s]
                    buf.features.append(features[sel])
                    buf.thumbs.append(batch["thumb"].numpy()[sel])
                    buf.ok.append(ok[sel])
                    buf.crop_px = buf.crop_px or int(batch["crop_px"].numpy()[sel].max())
                    buf.seen += int(sel.sum())
                report.cells += int(ok.sum())
                bar.update(len(ok))
                # Slides are contiguous in the loader: every slide before the last one seen is complete.
                last = int(slide_idx[-1])
                complete = last + 1 if buffers[last].seen == len(buffers[last].source) else last
                flush_ready(complete)
        flush_ready(len(buffers))  # includes slides with no crops at all
        for future in pending_writes:
            future.result()
    finally:
        bar.close()
        writer.shutdown(wait=True)


def _write(out: Path, buf: _SlideBuffer, backbone: Backbone | None, opts: EmbedOptions,
           report: EmbedReport, reference: StainReference | None = None) -> None:
    slide, src = buf.slide, buf.source
    n_dims = (backbone.feature_dim if backbone else 0) + (len(MORPHOLOGY_FEATURES) if opts.morphology else 0)
    ok = np.concatenate(buf.ok) if buf.ok else np.zeros(0, bool)
    features = np.concatenate(buf.features)[ok] if buf.features else np.zeros((0, n_dims), np.float32)
    thumbs = np.concatenate(buf.thumbs)[ok] if buf.thumbs else np.zeros((0, THUMBNAIL_PX, THUMBNAIL_PX, 3), np.uint8)
    keep = np.flatnonzero(ok)
    cell_ids = [src.cell_ids[i] for i in keep]
    signature = _signature(opts, backbone, slide, reference)
    blocks = ([f"{backbone.name}:{backbone.feature_dim}"] if backbone else []) + (
        [f"morphology:{len(MORPHOLOGY_FEATURES)}"] if opts.morphology else [])
    write_bag(
        out / f"{slide.slide_id}.h5", features.astype(np.float16), slide_id=slide.slide_id,
        patient_id=slide.patient_id, cell_ids=cell_ids, thumbnails=thumbs, coords=src.coords[keep],
        bboxes=None if src.bboxes is None else src.bboxes[keep],
        cell_types=None if src.cell_types is None else [src.cell_types[i] for i in keep],
        diagnostic=None if src.diagnostic is None else src.diagnostic[keep],
        field=None if src.field is None else src.field[keep], fields=src.field_names if src.field is not None else None,
        attribute_labels=None if src.attribute_labels is None else src.attribute_labels[keep],
        attribute_names=src.attribute_names if src.attribute_labels is not None else None,
        backbone=backbone.name if backbone else NO_BACKBONE,
        weights_sha256=backbone.weights_sha256 if backbone else "none",
        mpp=src.mpp if src.mpp is not None else math.nan, crop_px=src.crop_px or buf.crop_px,
        extra_attrs={"embed_signature": signature, "feature_blocks": ",".join(blocks),
                     "input_size": backbone.input_size if backbone else 0,
                     "backbone_output": backbone.output if backbone else "",
                     "morphology_features": ",".join(MORPHOLOGY_FEATURES) if opts.morphology else "",
                     # the slide's white point, stain vectors, thresholds and mpp, as the detector measured them
                     "calibration": json.dumps(src.calibration, sort_keys=True) if src.calibration else "",
                     "stain_normalize": reference.method if reference else "none",
                     "stain_reference": reference.to_json() if reference else ""},
    )
    report.written.append(slide.slide_id)
    if len(keep) == 0:
        report.empty.append(slide.slide_id)
        log.warning("slide %s: no readable cells; wrote an empty bag", slide.slide_id)
