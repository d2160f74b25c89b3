"""Everything MLflow: the tracker, tag names, trial states, UI text, the registry and promotion."""
