"""Host-side bilinear resampling against jax.image.resize and PIL (same half-pixel convention)."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax import image as jax_image
from PIL import Image

from puseg_jax.core import resample


@pytest.mark.parametrize("shape_in,shape_out", [((128, 128), (512, 512)), ((13, 7), (40, 33))])
def test_matches_jax_image_resize(shape_in, shape_out):
    x = np.random.default_rng(0).random(shape_in + (2,), dtype=np.float32)
    got = resample.resize_bilinear(x, shape_out)
    want = np.asarray(jax_image.resize(jnp.asarray(x), shape_out + (2,), "linear"))
    assert got.shape == shape_out + (2,)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_matches_pil_bilinear_upsampling():
    x = np.random.default_rng(1).random((32, 48), dtype=np.float32)
    got = resample.resize_bilinear(x, (96, 120))
    want = np.asarray(Image.fromarray(x, "F").resize((120, 96), Image.BILINEAR))
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_constant_stays_constant_identity_at_same_size_and_invalid_sizes():
    # Each output is a convex combination of two inputs: constants are preserved exactly.
    ones = np.full((5, 3), 0.25, np.float32)
    np.testing.assert_array_equal(resample.resize_bilinear(ones, (17, 11)), 0.25)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(resample.resize_bilinear(x, (3, 4)), x)
    with pytest.raises(ValueError):
        resample.resize_bilinear(x, (0, 4))
