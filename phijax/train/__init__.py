"""Training: optimizer and schedule, the jitted step, checkpoints, metrics, the loop."""
