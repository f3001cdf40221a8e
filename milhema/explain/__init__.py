"""``milhema explain``: per-cell scores, galleries, heatmaps, QuPath GeoJSON and HTML patient reports."""

from milhema.explain.faithfulness import diagnostic_auroc

__all__ = ["diagnostic_auroc"]
