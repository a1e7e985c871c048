"""Output: result files, tables, figures and experiment trackers."""
