"""Data augmentation applied inside the jitted step, from the step's own random key."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_translate(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Shifts each image by its own whole number of pixels in ``[-max_shift, max_shift]`` along
    height and width, filling the uncovered border with zeros (Hinton et al.'s "jitter").

    Args:
      images: ``[batch, height, width, channels]``.
      key: a PRNG key; the shifts are a pure function of it.
      max_shift: a Python int (it fixes the padding, so it is static under jit); 0 is a no-op.
    """
    if max_shift == 0:
        return images
    _, height, width, channels = images.shape
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
    padded = jnp.pad(images, pad)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        # An offset of max_shift is the unshifted image.
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)
