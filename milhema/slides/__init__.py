"""Cell sources: where the cells of a slide come from (crop folders now; whole-slide images later)."""

from milhema.slides.crops import CropFolder, list_crops, read_crop, read_truth

__all__ = ["CropFolder", "list_crops", "read_crop", "read_truth"]
