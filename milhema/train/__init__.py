"""Training and evaluation: splits, metrics, baselines (and MIL training)."""
