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


def random_crop_flip(
    images: jax.Array, key: jax.Array, *, pad: int = 4, fill: tuple[float, ...] | float = 0.0
) -> jax.Array:
    """The standard CIFAR augmentation: pads each image by ``pad`` pixels on every side with
    ``fill``, crops it back to its size at its own uniformly random offset in ``[0, 2 * pad]``
    along height and width, then mirrors it left-right with probability 1/2.

    Args:
      images: ``[batch, height, width, channels]``.
      key: a PRNG key; the offsets and flips are a pure function of it.
      pad: a Python int (it fixes the padded shape, so it is static under jit).
      fill: the border's value, one per channel or one for all; for normalised images, a
        black pixel's value after normalisation (``Dataset.padding_value``).
    """
    batch, height, width, channels = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    # jnp.pad fills with one value for all channels; a per-channel border needs this instead.
    border = jnp.broadcast_to(jnp.asarray(fill, images.dtype), (channels,))
    padded = jnp.broadcast_to(border, (batch, height + 2 * pad, width + 2 * pad, channels))
    padded = padded.at[:, pad : pad + height, pad : pad + width].set(images)

    def crop_flip(image: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
        window = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
        return jnp.where(flip, window[:, ::-1], window)

    return jax.vmap(crop_flip)(padded, offsets, flips)
