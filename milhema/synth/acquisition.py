"""Acquisition profiles: how one lab's stain, microscope, scanner or camera make a smear look.

The same cells look different from centre to centre: the stain (MGG, Wright, Wright-Giemsa, a
quick stain) and how long it ran, the lamp and white balance (the glass between cells reads
anywhere from ~150 to ~250 per RGB channel, often tinted: cream, yellow, bluish), the optics
(focus blur, vignetting of camera fields), the pixel size (0.08-0.5 µm/px) and the compression.
An :class:`AcquisitionProfile` fixes the centre of each; every slide then draws its own variation
around it (the per-slide stain jitter of :meth:`Stain.random`, plus lamp, blur and noise from the
profile's ranges).

``default`` is the simulator as it was before profiles existed (MGG, white lamp, 0.25 µm/px,
PNG crops, JPEG 90 scans): a cohort written without ``--acquisition`` is byte-identical to one
written before. ``mixed`` draws one named profile per slide, as a multi-centre cohort would.
Sizes in µm, pixel sizes in µm per pixel, colours 0-255, JPEG quality 1-100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from milhema.synth.stain import STAIN_FAMILIES, Stain

DEFAULT_PROFILE = "default"
MIXED_PROFILE = "mixed"


@dataclass(frozen=True)
class AcquisitionProfile:
    """The centre of one lab's acquisition.

    Attributes:
        name: the ``--acquisition`` name.
        summary: one line for ``milhema synth --help``.
        mpp: µm per pixel (crops span 24 µm, so a crop is ``round(24 / mpp)`` px).
        stain: a stain family of :data:`~milhema.synth.stain.STAIN_FAMILIES`.
        intensity: multiplies every stain's optical density (1 = well stained, 0.6 = pale).
        background: RGB (0-255) of bare glass at the centre of the field.
        vignetting: fraction of light lost in the corners of a camera field (0 = flat field).
        blur_um: range of the per-slide focus blur (Gaussian sigma, µm).
        noise: range of the per-slide sensor noise (sd, 0-255 units).
        jpeg_quality: JPEG quality of scan tiles, fields and crops; 0 = crops as PNG (lossless).
        field_px: (width, height) of one photographed field (``--fields``).
    """

    name: str
    summary: str
    mpp: float
    stain: str
    intensity: float
    background: tuple[float, float, float]
    vignetting: float
    blur_um: tuple[float, float]
    noise: tuple[float, float]
    jpeg_quality: int
    field_px: tuple[int, int] = (1280, 960)

    def describe(self) -> str:
        """The profile's parameters in one line (for --help and synth.json)."""
        r, g, b = (round(v) for v in self.background)
        vig = f", vignetting {self.vignetting:.0%}" if self.vignetting else ""
        jpeg = f"JPEG {self.jpeg_quality}" if self.jpeg_quality else "PNG crops, JPEG 90 scans"
        return (f"{self.mpp:g} µm/px, {self.stain.upper() if self.stain == 'mgg' else self.stain} "
                f"x{self.intensity:g}, glass ({r}, {g}, {b}){vig}, blur {self.blur_um[0]:g}-{self.blur_um[1]:g} µm, "
                f"{jpeg}")


PROFILES: dict[str, AcquisitionProfile] = {p.name: p for p in (
    AcquisitionProfile("default", "the simulator before profiles: MGG on a white lamp, per-slide stain jitter",
                       0.25, "mgg", 1.0, (251.0, 246.0, 249.0), 0.0, (0.075, 0.375), (1.0, 5.0), 0),
    AcquisitionProfile("scanner-40x", "slide scanner, 40x dry objective, MGG (European lab)",
                       0.25, "mgg", 1.0, (238.0, 236.0, 240.0), 0.0, (0.08, 0.30), (1.5, 3.0), 85),
    AcquisitionProfile("scanner-20x", "slide scanner, 20x: coarse pixels, greyish glass, darker MGG",
                       0.5, "mgg", 1.1, (226.0, 224.0, 232.0), 0.0, (0.15, 0.45), (1.5, 3.0), 80),
    AcquisitionProfile("analyser-100x", "cell analyser (CellaVision-class), 100x oil: cream glass, MGG",
                       0.1, "mgg", 1.0, (250.0, 228.0, 204.0), 0.0, (0.04, 0.15), (1.0, 2.0), 95),
    AcquisitionProfile("wright-giemsa-60x", "60x oil scanner, Wright-Giemsa (North American lab)",
                       0.17, "wright-giemsa", 1.0, (242.0, 240.0, 236.0), 0.0, (0.06, 0.25), (1.5, 3.0), 90),
    AcquisitionProfile("wright-pale", "40x scanner, Wright stain run short: pale, bluish-grey glass",
                       0.25, "wright", 0.6, (232.0, 232.0, 238.0), 0.0, (0.08, 0.30), (1.5, 3.0), 85),
    AcquisitionProfile("camera-yellow", "camera on a microscope, halogen lamp without daylight filter, "
                       "quick stain: yellow glass, vignetting, soft focus",
                       0.16, "rapid", 0.9, (250.0, 244.0, 172.0), 0.3, (0.20, 0.60), (3.0, 6.0), 75,
                       (1280, 960)),
    AcquisitionProfile("camera-dim", "camera on a 100x oil objective, under-exposed: dark glass (~165), "
                       "vignetting, dense MGG",
                       0.08, "mgg", 1.2, (168.0, 158.0, 172.0), 0.25, (0.10, 0.40), (3.0, 6.0), 70,
                       (1280, 960)),
)}
NAMED_PROFILES: tuple[str, ...] = tuple(name for name in PROFILES if name != DEFAULT_PROFILE)
PROFILE_NAMES: tuple[str, ...] = (*PROFILES, MIXED_PROFILE)


def get_profile(name: str) -> AcquisitionProfile:
    """The named profile (``mixed`` is not one: it is resolved per slide by :func:`slide_profile`).

    Raises:
        ValueError: an unknown name.
    """
    if name not in PROFILES:
        raise ValueError(f"unknown acquisition profile {name!r}; known: {', '.join(PROFILE_NAMES)}")
    return PROFILES[name]


def slide_profile(name: str, rng: np.random.Generator) -> AcquisitionProfile:
    """The profile of one slide: ``name``, or for ``mixed`` one named profile drawn with ``rng``."""
    if name == MIXED_PROFILE:
        return PROFILES[NAMED_PROFILES[int(rng.integers(len(NAMED_PROFILES)))]]
    return get_profile(name)


@dataclass(frozen=True)
class Illumination:
    """The light of one slide: lamp colour (RGB reached through clean glass with no stain at all)
    and the vignetting of the optics. ``lamp`` is float32 (3,); ``vignetting`` as in the profile."""

    lamp: tuple[float, float, float]
    vignetting: float = 0.0

    def gain(self, x0: float, y0: float, height: int, width: int, field: tuple[float, float],
             centre: tuple[float, float]) -> np.ndarray:
        """float32 [height, width, 3]: the light reaching pixels (x0.., y0..) of a ``field`` = (width,
        height) px image whose optical axis is at ``centre`` (px); falls off as the square of the
        distance from the axis, to ``1 - vignetting`` in the corner farthest from it."""
        lamp = np.asarray(self.lamp, np.float32)
        if self.vignetting <= 0:
            return np.broadcast_to(lamp, (height, width, 3)).astype(np.float32)
        ys = (np.arange(height, dtype=np.float64) + (y0 - centre[1])).astype(np.float32)[:, None]
        xs = (np.arange(width, dtype=np.float64) + (x0 - centre[0])).astype(np.float32)[None, :]
        far = max(math.hypot(cx - centre[0], cy - centre[1]) for cx in (0.0, field[0]) for cy in (0.0, field[1]))
        falloff = 1.0 - np.float32(self.vignetting) * (xs * xs + ys * ys) / np.float32(far * far)
        return (falloff[..., None] * lamp).astype(np.float32)


def slide_look(profile: AcquisitionProfile, stain_rng: np.random.Generator, strength: float,
               rng: np.random.Generator, mpp: float) -> tuple[Stain, Illumination | None]:
    """The stain and light of one slide of ``profile`` at ``mpp`` µm/px.

    ``stain_rng`` makes the same draws as :meth:`Stain.random` always did (so the rest of the slide
    is drawn as before); ``rng``, a separate stream, draws the profile's per-slide variation. The
    default profile returns ``Stain.random(stain_rng, strength)`` and no illumination: unchanged output.
    """
    if profile.name == DEFAULT_PROFILE:
        return Stain.random(stain_rng, strength), None
    base = Stain.family(profile.stain)
    stain = Stain.random(stain_rng, strength, base=base)
    intensity = np.float32(profile.intensity * math.exp(rng.normal(0.0, 0.06)))
    # One lamp level per slide (exposure) and a faint per-channel white-balance drift.
    level = math.exp(rng.normal(0.0, 0.03))
    balance = np.exp(rng.normal(0.0, 0.012, 3))
    glass = np.asarray(profile.background) * level * balance
    lamp = glass * np.exp(base.background_od.astype(np.float64))   # glass = lamp · exp(-background OD)
    stain = replace(
        stain, nucleus_od=stain.nucleus_od * intensity, cytoplasm_od=stain.cytoplasm_od * intensity,
        eosin_od=stain.eosin_od * intensity, granule_od=stain.granule_od * intensity,
        blur_sigma=float(rng.uniform(*profile.blur_um)) / mpp, noise_sd=float(rng.uniform(*profile.noise)))
    return stain, Illumination((float(lamp[0]), float(lamp[1]), float(lamp[2])), profile.vignetting)


def profile_table() -> list[str]:
    """Markdown rows (name | parameters | what it stands for) of every profile, for docs and --help."""
    rows = [f"| `{p.name}` | {p.describe()} | {p.summary} |" for p in PROFILES.values()]
    return [*rows, f"| `{MIXED_PROFILE}` | one of the named profiles per slide | a multi-centre cohort |"]


__all__ = ["AcquisitionProfile", "DEFAULT_PROFILE", "Illumination", "MIXED_PROFILE", "NAMED_PROFILES",
           "PROFILES", "PROFILE_NAMES", "STAIN_FAMILIES", "get_profile", "profile_table", "slide_look",
           "slide_profile"]
