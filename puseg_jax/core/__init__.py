"""Leaves: the dataset families, config fields that change a run, the run's log and metric
writer, host resampling. Plain arrays, files and text; nothing of the package."""
