"""Data: building the TFDS domains, reading them, transforms, and the training and evaluation
batches."""
