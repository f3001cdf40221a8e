"""Per-slide May-Grünwald-Giemsa (MGG) stain: optical density (OD) vectors and density → OD.

Images are built in OD (absorbance per RGB channel, natural log) so that overlapping structures
combine the way stains do under transmitted light (Beer–Lambert: absorbances add). A cell or a
background object is drawn as four *stain density* layers (chromatin, basophilic cytoplasm, eosin,
azurophilic granules; dimensionless, 1 = one unit of stain); a :class:`Stain` holds the OD of one
unit of each stain for one slide and turns densities into OD, so it recolours a whole smear at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Density layers of a cell, in the order of the rows of the stain matrix.
_NUC, _CYT, _EOS, _GRA = range(4)

# Colour (RGB 0-255, white light) seen through one unit of each stain, per stain family:
# (chromatin, basophilic cytoplasm, eosin / red cells, granules). MGG (Pappenheim) nuclei are
# purple-violet and red cells salmon; Wright nuclei bluer-purple and red cells pink-grey;
# Wright-Giemsa lies between; quick stains (Diff-Quik, RAL 555: the "rapid stain" of camera set-ups)
# give magenta-purple nuclei and pale red cells. See docs/DOMAIN.md.
STAIN_FAMILIES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "mgg": ((95, 52, 134), (160, 180, 225), (235, 147, 137), (182, 100, 150)),
    "wright": ((78, 62, 150), (152, 184, 232), (228, 152, 162), (172, 106, 166)),
    "wright-giemsa": ((86, 56, 142), (156, 182, 228), (232, 149, 150), (178, 102, 158)),
    "rapid": ((122, 42, 112), (178, 168, 212), (244, 196, 180), (198, 118, 150)),
}


# --------------------------------------------------------------------------------------------
# Stain
# --------------------------------------------------------------------------------------------

def _od(rgb: tuple[float, float, float]) -> np.ndarray:
    """OD of an RGB colour (0–255) seen through one unit of stain."""
    return (-np.log(np.asarray(rgb, dtype=np.float64) / 255.0)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Stain:
    """Per-slide appearance. OD = optical density (absorbance) per RGB channel, Beer–Lambert.

    Each ``*_od`` is a float32 array of shape (3,): the absorbance (natural log) in R, G, B of one
    unit of that stain; a pixel's colour is ``255 * exp(-sum(density_k * od_k))``.
    Arrays are stored as read-only copies. ``eq=False`` because arrays have no scalar equality.
    """

    nucleus_od: np.ndarray      # (3,) absorbance of chromatin (azure/methylene-blue: violet-purple)
    cytoplasm_od: np.ndarray    # (3,) basophilic cytoplasm (blue-grey)
    eosin_od: np.ndarray        # (3,) eosin (pink/orange: red cells, eosinophil granules)
    granule_od: np.ndarray      # (3,) azurophilic/neutrophilic granules (lilac-pink-purple)
    background_od: np.ndarray   # (3,) glass/plasma tint (small)
    blur_sigma: float           # px, focus blur applied to the composed image
    noise_sd: float             # sd of additive pixel noise, in 0-255 units

    def __post_init__(self) -> None:
        for name in ("nucleus_od", "cytoplasm_od", "eosin_od", "granule_od", "background_od"):
            arr = np.array(getattr(self, name), dtype=np.float32).reshape(3)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @classmethod
    def default(cls) -> Stain:
        """A well-stained, well-focused slide: the centre of :meth:`random`."""
        return cls(
            # One unit of each stain, chosen from typical MGG colours: dense chromatin ~(85, 45, 125),
            # lymphocyte sky-blue cytoplasm at 0.7 units, red cells salmon-pink at 0.7 units.
            nucleus_od=_od((95, 52, 134)),
            cytoplasm_od=_od((160, 180, 225)),
            eosin_od=_od((235, 147, 137)),
            granule_od=_od((182, 100, 150)),
            background_od=_od((251, 246, 249)),
            blur_sigma=0.6,
            noise_sd=2.0,
        )

    @classmethod
    def family(cls, name: str) -> Stain:
        """The centre of a stain family: ``mgg`` (:meth:`default`), ``wright``, ``wright-giemsa`` or
        ``rapid`` (a Diff-Quik / RAL 555-type quick stain); see :data:`STAIN_FAMILIES`.

        Raises:
            ValueError: an unknown family.
        """
        if name not in STAIN_FAMILIES:
            raise ValueError(f"unknown stain family {name!r}; known: {', '.join(STAIN_FAMILIES)}")
        nucleus, cytoplasm, eosin, granule = STAIN_FAMILIES[name]
        d = cls.default()
        return cls(_od(nucleus), _od(cytoplasm), _od(eosin), _od(granule), d.background_od, d.blur_sigma,
                   d.noise_sd)

    @classmethod
    def random(cls, rng: np.random.Generator, strength: float = 1.0, base: Stain | None = None) -> Stain:
        """Random per-slide stain/scanner variation around ``base`` (default: :meth:`default`; hue & intensity shift of each OD vector, blur 0.3–1.5 px, noise); strength scales the variation (0 = base).

        The draws are the same whatever ``base``, so a base changes colours, never the rest of a slide."""
        s = float(max(strength, 0.0))
        d = cls.default() if base is None else base
        # Smear thickness and staining time darken every stain together; the separate per-stain
        # factors then move the balance (bluer or pinker slides) and the per-channel ones the hue.
        overall = math.exp(rng.normal(0.0, 0.12 * s))

        def jitter(v: np.ndarray, sd_int: float, sd_hue: float) -> np.ndarray:
            scale = overall * math.exp(rng.normal(0.0, sd_int * s))
            hue = np.exp(rng.normal(0.0, sd_hue * s, 3))
            return (v * scale * hue).astype(np.float32)

        nucleus = jitter(d.nucleus_od, 0.12, 0.08)
        cytoplasm = jitter(d.cytoplasm_od, 0.15, 0.10)
        eosin = jitter(d.eosin_od, 0.15, 0.10)
        granule = jitter(d.granule_od, 0.15, 0.10)
        # Background: brighter/duller glass and a faint colour cast (yellowish, bluish, pinkish).
        bg = d.background_od * math.exp(rng.normal(0.0, 0.5 * s)) + s * np.abs(rng.normal(0.0, 0.012, 3))
        blur = d.blur_sigma + min(s, 1.0) * (rng.uniform(0.3, 1.5) - d.blur_sigma)
        noise = d.noise_sd + min(s, 1.0) * (rng.uniform(1.0, 5.0) - d.noise_sd)
        return cls(nucleus, cytoplasm, eosin, granule, bg.astype(np.float32), float(blur), float(noise))

    def matrix(self) -> np.ndarray:
        """float32 [4, 3]: OD per unit density for the layers chromatin, cytoplasm, eosin, granules."""
        return np.stack([self.nucleus_od, self.cytoplasm_od, self.eosin_od, self.granule_od])


def _densities_to_od(dens: np.ndarray, stain: Stain) -> np.ndarray:
    """[4, h, w] densities → float32 [h, w, 3] OD."""
    k, h, w = dens.shape
    return (dens.reshape(k, h * w).T @ stain.matrix()).reshape(h, w, 3).astype(np.float32, copy=False)
