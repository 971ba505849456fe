"""The report: the per-feature table, its plots, feature cards and the HTML page."""
