"""Training: the trainer base and its hooks, the loop, checkpoints, schedules."""
