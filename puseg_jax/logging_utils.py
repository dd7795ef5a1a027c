"""Metric writing: JSON lines and TensorBoard (tensorboardX, no TensorFlow), process 0 only."""

import json
import os
import time
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb`.

    Every process may call it; only process 0 writes.
    """

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.active:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: [H, W, 3] float in [0, 1] or uint8."""
        if self.active:
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        if self.active:
            self._tb.add_histogram(tag, np.asarray(values).ravel(), step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.active:
            self._tb.add_hparams(hparams, metrics, name="hparams")

    def flush(self) -> None:
        if self.active:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.active:
            self._tb.close()
            self._jsonl.close()
