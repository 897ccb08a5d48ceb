"""Loss functions: pure ``(predictions, targets) -> scalar`` functions.

The per-example losses come from optax; flaxtrain adds shape and dtype checks
(a mismatch is a ValueError naming the argument) and the reduction to a mean
over the batch, optionally over the examples selected by ``mask`` (padding in
a last batch, for example).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxtrain import _checks

__all__ = [
    'softmax_cross_entropy',
    'softmax_cross_entropy_with_integer_labels',
    'mean_squared_error',
    'l2_penalty',
    'masked_mean',
]


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of ``values``, counting only the entries where ``mask`` is non-zero.

  Args:
    values: per-example values, shape ``(batch,)``.
    mask: optional weights of shape ``(batch,)``; 1 keeps an example, 0 drops it.

  Returns:
    A scalar. With an all-zero mask the result is 0, not NaN.

  Example:
    >>> float(masked_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([1, 1, 0])))
    2.0
  """
  if mask is None:
    return jnp.mean(values)
  _checks.check_shape('mask', mask, values.shape, 'one weight per example')
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Mean cross-entropy between ``logits`` and one-hot (or soft) ``labels``.

  Args:
    logits: unnormalised scores, shape ``(batch, num_classes)``, float.
    labels: class probabilities of the same shape, float (``jax.nn.one_hot``).
    mask: optional per-example weights, shape ``(batch,)``.

  Returns:
    The mean over the batch of ``-sum(labels * log_softmax(logits))``.

  Example:
    >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    >>> loss = softmax_cross_entropy(logits, jnp.eye(2))
  """
  _checks.check_floating('logits', logits)
  _checks.check_floating('labels', labels)
  _checks.check_shape(
      'labels', labels, jnp.shape(logits),
      'same as logits; for class indices use '
      'softmax_cross_entropy_with_integer_labels',
  )
  return masked_mean(optax.softmax_cross_entropy(logits, labels), mask)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Mean cross-entropy between ``logits`` and integer class ``labels``.

  Labels outside ``[0, num_classes)`` cannot be detected inside ``jax.jit``;
  optax returns a meaningless value for them, so check labels on the host.

  Args:
    logits: unnormalised scores, shape ``(batch, num_classes)``, float.
    labels: class indices, shape ``(batch,)``, integer dtype.
    mask: optional per-example weights, shape ``(batch,)``.

  Returns:
    The mean over the batch of ``-log_softmax(logits)[label]``.

  Example:
    >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    >>> loss = softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
  """
  _checks.check_floating('logits', logits)
  _checks.check_integer('labels', labels)
  _checks.check_shape(
      'labels', labels, jnp.shape(logits)[:-1], 'logits.shape without the class axis'
  )
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return masked_mean(per_example, mask)


def mean_squared_error(
    predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Mean squared error, averaged over every element (batch and outputs).

  Args:
    predictions: float array, shape ``(batch, ...)``.
    targets: float array of the same shape. Shapes must match exactly: a
      ``(batch,)`` target against ``(batch, 1)`` predictions would otherwise
      broadcast to ``(batch, batch)`` and give a wrong loss without an error.
    mask: optional per-example weights, shape ``(batch,)``.

  Returns:
    A scalar.

  Example:
    >>> float(mean_squared_error(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0])))
    2.0
  """
  _checks.check_floating('predictions', predictions)
  _checks.check_floating('targets', targets)
  _checks.check_shape('targets', targets, jnp.shape(predictions), 'same as predictions')
  if jnp.ndim(predictions) == 0:
    raise ValueError('predictions: expected an array with a batch axis, got a scalar')
  squared = jnp.square(predictions - targets)
  per_example = squared.reshape(squared.shape[0], -1).mean(axis=1)
  return masked_mean(per_example, mask)


def l2_penalty(model: nnx.Module) -> jax.Array:
  """Sum of squares of every ``nnx.Param`` in ``model``.

  Only trainable parameters count: BatchNorm statistics, RNG counters and keys
  are state, not weights, and squaring a PRNG key raises. Multiply by your
  regularisation strength and add to the loss; or prefer decoupled weight
  decay (``optax.adamw``), which notebook 03 compares with this.

  Args:
    model: an NNX module.

  Returns:
    A float32 scalar (0.0 for a model without parameters).

  Example:
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> penalty = l2_penalty(model)
  """
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  return sum((jnp.sum(jnp.square(p.astype(jnp.float32))) for p in params), jnp.float32(0.0))
