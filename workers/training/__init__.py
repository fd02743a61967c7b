"""Training: read the window, validate it, search hyperparameters and fit the candidate."""
