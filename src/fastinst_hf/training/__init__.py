"""Training with accelerate: arguments, model set-up, optimiser and schedule, checkpoints, metrics, the loop."""
