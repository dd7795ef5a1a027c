"""Training: the config checks (`config`), the state and steps (`steps`), the loop
(`trainer`) and checkpoints. Kept light: importing it loads none of its modules."""
