"""Training: the fit loop, callbacks, learning-rate schedules and device placement."""
