"""The model: the U-Net, its convolutions, and every method's loss and uncertainty."""
