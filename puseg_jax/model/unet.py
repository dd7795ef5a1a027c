"""The segmentation network: a 2-D U-Net with a logit head and a log-variance head (Flax Linen).

Linen rather than NNX: the train step must be one pure function of (state, batch, rng) that is
wrapped unchanged by `jax.pmap` and by `jax.jit(shard_map(...))` (see `parallel.py`), and whose
state (params, BatchNorm statistics, optimizer state) is a plain pytree for orbax. Linen's
`apply` is exactly that function; with NNX we would split/merge graph state at every boundary.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from puseg_jax.model import conv_ops


class ConvNormAct(nn.Module):
    """3x3 convolution (no bias: a norm follows), normalisation, ReLU."""

    features: int
    norm: str = "batch"
    num_groups: int = 8
    bn_axis_name: str | None = None
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv_ops.Conv3x3(self.features, impl=self.conv_impl, dtype=self.dtype)(x)
        if self.norm == "batch":
            # Statistics are averaged over `bn_axis_name` (the data-parallel axis) so that every
            # device normalises with the global batch statistics: 1 and N devices agree.
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                axis_name=bn_axis_name_if(train, self.bn_axis_name),
                dtype=self.dtype,
            )(x)
        elif self.norm == "group":
            # GroupNorm needs the group count to divide the width: gcd(num_groups, width) does.
            groups = math.gcd(self.num_groups, self.features)
            x = nn.GroupNorm(num_groups=groups, dtype=self.dtype)(x)
        else:
            raise ValueError(f"Unknown norm {self.norm!r}; expected 'batch' or 'group'.")
        return nn.relu(x)


def bn_axis_name_if(train: bool, axis_name: str | None) -> str | None:
    # At inference BatchNorm uses running statistics and needs no collective.
    return axis_name if train else None


class DoubleConv(nn.Module):
    """Two ConvNormAct blocks of the same width."""

    features: int
    norm: str = "batch"
    num_groups: int = 8
    bn_axis_name: str | None = None
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for _ in range(2):
            x = ConvNormAct(
                self.features,
                norm=self.norm,
                num_groups=self.num_groups,
                bn_axis_name=self.bn_axis_name,
                conv_impl=self.conv_impl,
                dtype=self.dtype,
            )(x, train)
        return x


def example_dropout(x: jax.Array, rate: float, rng: jax.Array, example_ids: jax.Array) -> jax.Array:
    """Inverted dropout whose mask of each example is drawn from `fold_in(rng, example_id)`.

    With the example's index in the global batch, the masks do not depend on how the batch is
    split across devices (`nn.Dropout` draws one mask for the device's whole share).

    Args:
      x: activations [B, ...].
      rate: probability of dropping an activation, in (0, 1).
      rng: the layer's key (the same on every device).
      example_ids: [B] indices of these examples in the global batch.

    Returns:
      x with dropped activations zeroed and the others scaled by 1 / (1 - rate).
    """
    keep_prob = 1.0 - rate

    def one(eid):
        return jax.random.bernoulli(jax.random.fold_in(rng, eid), keep_prob, x.shape[1:])

    keep = jax.vmap(one)(example_ids)
    return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


class UNet(nn.Module):
    """U-Net with len(widths) - 1 down-sampling levels and two 1x1 heads.

    Attributes:
      num_classes: K, channels of the logit head mu.
      widths: channels per level, encoder top to bottleneck (default 4 down-samplings).
      logvar_channels: channels of the log-variance head s: 0 (no head), 1 (shared across
        classes) or K.
      norm: 'batch' or 'group'.
      num_groups: GroupNorm groups (gcd with each width, which they must divide).
      dropout_rate: dropout in the decoder blocks (0 disables; >0 enables MC dropout).
      bn_axis_name: the named data-parallel axis BatchNorm averages statistics over.
      conv_impl: 'xla' or 'fast' (see `conv_ops`).
      dtype: compute dtype (parameters stay float32).
      remat: recompute each block's activations in the backward pass (`nn.remat`) instead of
        keeping them: less memory, one more forward pass. Parameter names are unchanged.
    """

    num_classes: int
    widths: Sequence[int] = (32, 64, 128, 256, 512)
    logvar_channels: int = 0
    norm: str = "batch"
    num_groups: int = 8
    dropout_rate: float = 0.0
    bn_axis_name: str | None = None
    conv_impl: str = "xla"
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool,
        mc_dropout: bool = False,
        example_ids: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Runs the network.

        Args:
          x: images, float32 [B, H, W, C]; H and W divisible by 2 ** (len(widths) - 1).
          train: BatchNorm in training mode (batch statistics, updates running averages).
          mc_dropout: apply decoder dropout even when not training (MC-dropout sampling).
          example_ids: [B] indices of the examples in the global batch; when given, dropout
            draws each example's mask from its index (`example_dropout`), so that the masks do
            not depend on the device layout.

        Returns:
          {'logits': [B, H, W, K] float32, 'log_var': [B, H, W, logvar_channels] float32 (only if
          logvar_channels > 0)}.
        """
        block = dict(
            norm=self.norm,
            num_groups=self.num_groups,
            bn_axis_name=self.bn_axis_name,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
        )
        # `train` is a Python bool (static for remat); explicit names keep the parameter tree
        # of the plain model ('DoubleConv_i'), whatever the wrapper class is called.
        block_cls = nn.remat(DoubleConv, static_argnums=(2,)) if self.remat else DoubleConv
        blocks = iter(range(2 * len(self.widths) - 1))

        def double_conv(width, x):
            return block_cls(width, **block, name=f"DoubleConv_{next(blocks)}")(x, train)

        x = x.astype(self.dtype)
        skips = []
        for width in self.widths[:-1]:
            x = double_conv(width, x)
            skips.append(x)
            x = conv_ops.max_pool2x2(x, impl=self.conv_impl)
        x = double_conv(self.widths[-1], x)
        for width, skip in zip(reversed(self.widths[:-1]), reversed(skips), strict=False):
            x = conv_ops.ConvTranspose(
                width, (2, 2), strides=(2, 2), dtype=self.dtype, impl=self.conv_impl
            )(x)
            x = jnp.concatenate([x, skip], axis=-1)
            x = double_conv(width, x)
            if self.dropout_rate > 0:
                deterministic = not (train or mc_dropout)
                if example_ids is None or deterministic:
                    x = nn.Dropout(self.dropout_rate, deterministic=deterministic)(x)
                else:
                    x = example_dropout(x, self.dropout_rate, self.make_rng("dropout"), example_ids)
        out = {
            "logits": nn.Conv(self.num_classes, (1, 1), name="logits_head")(x).astype(jnp.float32)
        }
        if self.logvar_channels:
            out["log_var"] = nn.Conv(self.logvar_channels, (1, 1), name="log_var_head")(x).astype(
                jnp.float32
            )
        return out
