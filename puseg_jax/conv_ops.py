"""Convolution used by the U-Net, with a backend-selected implementation.

`impl='xla'` is Flax's `nn.Conv` (XLA's native convolution, used on GPU and TPU). `impl='fast'`
is reserved for a CPU implementation with a custom VJP; `impl='auto'` picks per backend.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def resolve_impl(impl: str) -> str:
    """Maps 'auto' to the implementation for the default backend."""
    if impl == "auto":
        return "xla"
    if impl not in ("xla",):
        raise ValueError(f"Unknown conv implementation {impl!r}; expected 'auto' or 'xla'.")
    return impl


class Conv3x3(nn.Module):
    """3x3 'SAME' convolution without bias (every use is followed by a norm)."""

    features: int
    impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resolve_impl(self.impl)
        return nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(x)
