"""`tally replay`: rebuilds a sink's projection from the events topic."""
