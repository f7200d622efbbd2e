"""Training: the optimizer and schedule, the train/eval loop, checkpoints, and the run that ties them."""
