"""Cell sources: where the cells of a slide come from.

A slide's ``source`` in slides.csv is a folder of single-cell crops (:mod:`milhema.slides.crops`)
or a scanned smear, a pyramidal TIFF / SVS / NDPI read through tiffslide
(:mod:`milhema.slides.wsi`), whose white cells are found by a registered detector
(:mod:`milhema.slides.detect`). :func:`milhema.slides.source.open_source` turns either into one
list of cells for embedding.
"""

from milhema.slides.crops import CropFolder, list_crops, read_crop, read_truth

__all__ = ["CropFolder", "list_crops", "read_crop", "read_truth"]
