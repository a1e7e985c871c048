"""Studies, each an Experiment with one run(ctx)."""
