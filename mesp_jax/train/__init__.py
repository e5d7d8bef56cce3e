"""Training: sharding, the generic loop, checkpoints and metrics."""
