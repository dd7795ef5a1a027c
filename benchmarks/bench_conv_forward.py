"""The 3x3 convolution's forward pass on the CPU: XLA's (Eigen, YNNPACK), Winograd, and oneDNN.

The forward pass and the input gradient of a 3x3 'SAME' stride-1 convolution are the same
operation (the input gradient is the convolution of the output gradient with the kernel turned
by 180 degrees, C and K swapped), so this times one of them, per layer shape:

  eigen     XLA's convolution as the 'eigen' plans compile it (convolutions off YNNPACK)
  ynn       XLA's convolution with its default library, YNNPACK
  winograd  Winograd's F(2x2, 3x3) compiled on this machine (native_conv.conv3x3, the 'native'
            plan's forward pass and input gradient), checked against eigen within 1e-4
  torch     PyTorch's (channels_last, oneDNN), for reference

Times are the minimum of --reps calls, in ms, with all cores (or --cores N pinned); keep the
machine otherwise idle.

  python benchmarks/bench_conv_forward.py                  # the paper shapes' layers
  python benchmarks/bench_conv_forward.py --layers 8x128x128x16x16 --variants eigen winograd
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_weight_grad import layer_table, time_compiled  # noqa: E402

# N x H x W x C x K: a layer of each level of the fundus (256) and prostate (384) U-Nets at the
# paper widths, the decoder's concatenations, and the CPU budget's largest layers (128).
LAYERS = (
    "8x384x384x32x32",
    "8x256x256x32x32",
    "8x256x256x64x32",
    "8x128x128x64x64",
    "8x64x64x128x128",
    "8x48x48x512x256",
    "8x32x32x256x256",
    "8x32x32x512x256",
    "8x24x24x512x512",
    "8x16x16x512x512",
    "8x8x8x256x256",
    "8x128x128x16x16",
    "8x128x128x32x16",
)
VARIANTS = ("eigen", "ynn", "winograd", "torch")
_REDUCE = "LIBRARY_FUSION_TYPE_REDUCE"


def _jax_variant(name: str):
    """(function (x, kernel) -> y, XLA compiler options) for a JAX variant name."""
    from puseg_jax.model import conv_ops, native_conv

    if name == "eigen":
        return conv_ops._conv_same, {"xla_cpu_experimental_ynn_fusion_type": _REDUCE}
    if name == "ynn":
        return conv_ops._conv_same, None
    if name == "winograd":
        if not native_conv.available():
            raise SystemExit(f"winograd: {native_conv.unavailable_reason()}")
        return native_conv.conv3x3, None
    raise ValueError(f"unknown variant {name!r}")


def time_torch(x: np.ndarray, kernel: np.ndarray, reps: int):
    """ms of PyTorch's forward pass (channels_last, oneDNN) for the same layer."""
    import torch

    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    wt = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad():
        torch.nn.functional.conv2d(xt, wt, padding=1)
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.nn.functional.conv2d(xt, wt, padding=1)
            times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None):
    def inputs(rng, n, h, w, c, k):
        x = rng.standard_normal((n, h, w, c), dtype=np.float32)
        return x, (rng.standard_normal((3, 3, c, k)) / np.sqrt(9 * c)).astype(np.float32)

    def measure(name, arrays, reps):
        if name == "torch":
            return time_torch(*arrays, reps), None
        return time_compiled(*_jax_variant(name), arrays, reps)  # the first: the reference

    layer_table(argv, __doc__.split("\n\n")[0], LAYERS, VARIANTS, inputs, measure)


if __name__ == "__main__":
    main()
