"""Embedding throughput: ``milhema embed`` end to end (read crops or scan regions → resize →
backbone → HDF5) against the same backbone's forward pass alone on preloaded tensors (the
ceiling), same batch size, input size and precision, side by side in one run. Prints a table
and, with --record, appends it to docs/PERFORMANCE.md.

    python tools/bench_embed.py --scratch /tmp/bench_embed [--backbones resnet18,resnet50,dinobloom-s] \
        [--input-size 128] [--patients 6] [--workers 1] [--device auto] [--wsi] [--ceiling-cells N] [--record]

A backbone is any registered name (``milhema.embed.backbone.list_backbones``); a bare timm model
name means ``timm/<name>``. ``--input-size`` applies to timm models; other families (DinoBloom:
224 px) use their own input size. Backbones use random weights (nothing is downloaded); speed does
not depend on the weights. Scan detection is not part of the embedding time (see tools/bench_detect.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from perf_record import record  # tools/ is on sys.path when a tool runs as a script

from milhema.data.manifest import load_cohort
from milhema.device import resolve_device
from milhema.embed.backbone import TIMM_PREFIX, Backbone, backbone_family, load_backbone
from milhema.embed.pipeline import EmbedOptions, embed_cohort
from milhema.errors import MilhemaError
from milhema.slides.detect import DetectOptions
from milhema.slides.source import open_source

CLASSES = ("AML", "MDS", "VEXAS", "reactive")


def cohort_for(scratch: Path, patients: int, wsi: bool) -> Path:
    from milhema.synth.cohort import synthesize_cohort

    folder = scratch / f"cohort_{patients}_{'wsi' if wsi else 'crops'}"
    if not folder.exists():
        synthesize_cohort(folder, patients, seed=3, cells_per_slide=150, wsi=wsi, progress=False)
    return folder


def registered_name(name: str) -> str:
    """``resnet18`` -> ``timm/resnet18``; a registered name (``dinobloom-s``, ``timm/...``) as it is."""
    try:
        backbone_family(name)
        return name
    except MilhemaError:
        return TIMM_PREFIX + name


def ceiling(backbone: Backbone, crops: torch.Tensor, batch_size: int, device: torch.device, amp: bool) -> float:
    """Cells/s of normalise + forward on uint8 crops already resized and in memory."""
    model = backbone.model.to(device).to(memory_format=torch.channels_last).eval()
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255.0
    use_amp = amp and device.type == "cuda"

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, len(crops), batch_size):
                x = crops[start:start + batch_size].to(device, non_blocking=True)
                x = ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    model(x).float().cpu()

    run()   # warm-up (cuDNN autotuning, allocator)
    rates = []
    for _ in range(3):   # the median of three passes: single passes varied by ±15 % on the 2-core machine
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(crops) / (time.perf_counter() - start))
    return float(np.median(rates))


def preload(cohort_dir: Path, size: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` crops of the cohort, resized to ``size``, as uint8 [N, 3, size, size]."""
    from PIL import Image

    cohort = load_cohort(cohort_dir, CLASSES, ())
    images = []
    for slide in cohort.slides:
        source = open_source(slide, cohort_dir / ".bench_detections", 24.0, detect_options=DetectOptions(progress=False))
        for i in range(len(source)):
            rgb = Image.fromarray(source.read(i)).resize((size, size), Image.Resampling.BICUBIC)
            images.append(np.asarray(rgb).transpose(2, 0, 1))
            if len(images) >= limit:
                return torch.from_numpy(np.stack(images))
    return torch.from_numpy(np.stack(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", type=Path, default=Path("bench_embed"))
    parser.add_argument("--backbones", default="resnet18,resnet50,dinobloom-s")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--wsi", action="store_true", help="crops cut from simulated scans instead of crop files")
    parser.add_argument("--ceiling-cells", type=int, default=0,
                        help="forward-only ceiling on the first N preloaded cells (default 0: all; a ViT on a CPU is slow)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.scratch.mkdir(parents=True, exist_ok=True)
    cohort_dir = cohort_for(args.scratch, args.patients, args.wsi)
    cohort = load_cohort(cohort_dir, CLASSES, ())
    limit = args.ceiling_cells or 100_000
    crops_at: dict[int, torch.Tensor] = {}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    source = "scan regions" if args.wsi else "crop files"
    rows, cells, ceiling_cells = [], 0, 0
    for requested in args.backbones.split(","):
        name = registered_name(requested)
        size = args.input_size if name.startswith(TIMM_PREFIX) else None
        backbone = load_backbone(name, None, pretrained=False, input_size=size)
        if backbone.input_size not in crops_at:
            crops_at[backbone.input_size] = preload(cohort_dir, backbone.input_size, limit)
        crops = crops_at[backbone.input_size]
        top = ceiling(backbone, crops, args.batch_size, device, amp=True)
        out = args.scratch / f"bags_{name.replace('/', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        if args.wsi:   # reuse the detections: only embedding is timed
            shutil.copytree(cohort_dir / ".bench_detections", out / "detections")
        report = embed_cohort(cohort, out, EmbedOptions(
            backbone=name, pretrained=False, input_size=size, device=args.device,
            batch_size=args.batch_size, workers=args.workers, progress=False))
        cells, ceiling_cells = report.cells, len(crops)
        rows.append(f"| {requested} | {backbone.input_size} | {backbone.feature_dim} | {top:.1f} cells/s | "
                    f"{report.cells_per_s:.1f} cells/s | {report.cells_per_s / top:.2f} |")
        print(rows[-1], flush=True)
    lines = [f"## Embedding throughput ({machine}, torch {torch.__version__}, {datetime.date.today().isoformat()})", "",
             f"`python tools/bench_embed.py --backbones {args.backbones} --input-size {args.input_size} "
             f"--batch-size {args.batch_size} --workers {args.workers} --device {args.device} --patients {args.patients}"
             f"{' --wsi' if args.wsi else ''}{f' --ceiling-cells {args.ceiling_cells}' if args.ceiling_cells else ''}`: "
             f"{cells:,} cells from {source} embedded end to end, the ceiling on {ceiling_cells:,} preloaded cells; "
             f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}; `--input-size` applies to the timm models.", "",
             "| backbone | input px | features | forward only (ceiling) | `milhema embed` end to end | ratio |",
             "|---|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + f"\n\nMachine: {platform.machine()}, {os.cpu_count()} CPUs.\n"
    print(text)
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
