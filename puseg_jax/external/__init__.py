"""A trained run on a new hospital's folder (`python -m puseg_jax.evaluate`): the folder, the
pipeline, the writers of predictions and the quality-control review."""
