"""``milhema explain``: per-cell scores, galleries, heatmaps, QuPath GeoJSON and HTML patient reports."""
