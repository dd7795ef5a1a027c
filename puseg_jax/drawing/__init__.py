"""Drawing on plain arrays (a leaf: imports nothing of the package): the titled panels and
figure helpers."""
