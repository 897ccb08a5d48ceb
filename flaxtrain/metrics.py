"""Metrics computed on device inside a step: pure functions of arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxtrain import checks
from flaxtrain.losses import masked_mean

__all__ = ['accuracy']


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Fraction of examples whose arg-max logit equals the integer label.

  Args:
    logits: shape ``(batch, num_classes)``.
    labels: integer class indices, shape ``(batch,)``.
    mask: optional per-example weights, shape ``(batch,)``.

  Returns:
    A float32 scalar in ``[0, 1]``.

  Example:
    >>> float(accuracy(jnp.array([[1.0, 0.0], [1.0, 0.0]]), jnp.array([0, 1])))
    0.5
  """
  checks.check_integer('labels', labels)
  checks.check_shape('labels', labels, jnp.shape(logits)[:-1], 'logits.shape without the class axis')
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return masked_mean(correct, mask)
