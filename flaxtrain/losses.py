"""Loss functions: pure ``(predictions, targets) -> scalar`` functions.

The per-example losses come from optax; flaxtrain adds shape and dtype checks
(a mismatch is a ValueError naming the argument) and the reduction to a mean
over the batch, optionally over the examples selected by ``mask`` (padding in
a last batch, for example).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxtrain import checks

__all__ = [
    'LossFn',
    'call_loss_fn',
    'check_loss_fn',
    'softmax_cross_entropy',
    'softmax_cross_entropy_with_integer_labels',
    'mean_squared_error',
    'l2_penalty',
    'masked_mean',
]


class LossFn(Protocol):
  """What :func:`flaxtrain.fit` and the step factories call: ``loss_fn(model, batch) -> (loss, aux)``.

  Write it as a plain function; this class only documents the contract.

  Args:
    model: the ``nnx.Module`` being trained (in evaluation mode when
      validating: Dropout off, BatchNorm on its running averages).
    batch: a dict of arrays with one row per example, as a
      :class:`flaxtrain.DataLoader` yields it (e.g. ``'image'`` and
      ``'label'``). Padded evaluation batches also carry ``'mask'``
      (1 = real example, 0 = padding): the loss and every metric must weight
      examples by it, e.g. with :func:`masked_mean`, or validation counts the
      padding (``fit`` checks this before training).

  Returns:
    ``(loss, aux)``: ``loss`` a scalar (the mean over the batch's real
    examples), ``aux`` a dict of scalar metrics computed in the same forward
    pass (``{}`` if none), e.g. ``{'accuracy': ...}``.

  Example:
    >>> def loss_fn(model, batch):
    ...   logits = model(batch['image'])
    ...   mask = batch.get('mask')
    ...   loss = softmax_cross_entropy_with_integer_labels(logits, batch['label'], mask)
    ...   return loss, {}
  """

  def __call__(self, model: nnx.Module, batch: Mapping[str, Any]) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    ...


def check_loss_fn(loss_fn: Any) -> None:
  """Raises TypeError unless ``loss_fn`` can be called as ``loss_fn(model, batch)``.

  Only the signature is read; nothing is traced or run.

  Args:
    loss_fn: the candidate loss function.
  """
  if not callable(loss_fn):
    raise TypeError(f'loss_fn: expected a callable loss_fn(model, batch) -> (loss, aux), got {loss_fn!r}')
  try:
    signature = inspect.signature(loss_fn)
  except (TypeError, ValueError):  # some builtins have none: nothing to check
    return
  try:
    signature.bind(None, None)
  except TypeError as error:
    name = getattr(loss_fn, '__name__', type(loss_fn).__name__)
    raise TypeError(
        'loss_fn: expected a function called as loss_fn(model, batch) -> (loss, aux), got '
        f'{name}{signature}, which cannot be called with (model, batch): {error}'
    ) from None


def describe(value: Any) -> str:
  """A short description of ``value`` for error messages: its kind and shape, never its contents."""
  if isinstance(value, tuple):
    return f'a tuple of {len(value)}'
  shape = getattr(value, 'shape', None)
  return f'an array of shape {tuple(shape)}' if shape is not None else type(value).__name__


def call_loss_fn(
    loss_fn: LossFn, model: nnx.Module, batch: Mapping[str, Any], reserved: tuple[str, ...] = (),
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """``loss_fn(model, batch)``, checked against the :class:`LossFn` contract.

  The one place where flaxtrain checks what a loss function returns; the
  train step, the eval step and ``fit``'s checks before training all call
  it, so a broken ``loss_fn`` gets the same message everywhere. The checks
  read only shapes, so they cost nothing under ``jax.jit``.

  Args:
    loss_fn: ``loss_fn(model, batch) -> (loss, aux)``.
    model: the model to pass.
    batch: the batch to pass.
    reserved: metric names the caller adds itself, which ``aux`` may not use.

  Returns:
    ``(loss, aux)`` as ``loss_fn`` returned them.

  Raises:
    TypeError, ValueError: naming ``loss_fn`` and what it returned.

  Example:
    >>> loss, aux = call_loss_fn(lambda m, b: (jnp.float32(0.0), {}), None, {})
  """
  out = loss_fn(model, batch)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
        'loss_fn: expected loss_fn(model, batch) to return a pair (loss, aux): a scalar loss and a '
        f'dict of scalar metrics ({{}} for none), got {describe(out)}'
    )
  loss, aux = out
  if jnp.shape(loss) != ():
    raise ValueError(f'loss_fn: expected a scalar loss (the mean over the batch), got shape {jnp.shape(loss)}')
  if not isinstance(aux, Mapping):
    raise TypeError(
        f'loss_fn: expected aux to be a dict of scalar metrics ({{}} for none), got {type(aux).__name__}')
  for name, value in aux.items():
    if name in reserved:
      raise ValueError(f'loss_fn: aux key {name!r} is reserved (the step reports {", ".join(reserved)} itself)')
    if jnp.shape(value) != ():
      raise ValueError(f'loss_fn: expected aux[{name!r}] to be a scalar, got shape {jnp.shape(value)}')
  return loss, aux


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
  checks.check_shape('mask', mask, values.shape, 'one weight per example')
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
  checks.check_floating('logits', logits)
  checks.check_floating('labels', labels)
  checks.check_shape(
      'labels', labels, jnp.shape(logits),
      'same as logits; for class indices use '
      'softmax_cross_entropy_with_integer_labels',
  )
  return masked_mean(optax.softmax_cross_entropy(logits, labels), mask)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Mean cross-entropy between ``logits`` and integer class ``labels``.

  A label outside ``[0, num_classes)`` (``-1`` included) makes the loss NaN,
  also under ``jax.jit``, where it cannot raise: optax alone would return a
  finite, meaningless value. :func:`flaxtrain.fit` stops on a NaN loss and
  names the step, and checks a DataLoader's labels on the host before
  training. Examples whose ``mask`` is 0 may hold any label (e.g. -1 as
  "ignore").

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
  checks.check_floating('logits', logits)
  checks.check_integer('labels', labels)
  checks.check_shape(
      'labels', labels, jnp.shape(logits)[:-1], 'logits.shape without the class axis'
  )
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  valid = (labels >= 0) & (labels < jnp.shape(logits)[-1])
  per_example = jnp.where(valid, per_example, jnp.nan)
  if mask is not None:
    checks.check_shape('mask', mask, per_example.shape, 'one weight per example')
    per_example = jnp.where(mask != 0, per_example, 0.0)  # masked-out rows may hold any label
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
  checks.check_floating('predictions', predictions)
  checks.check_floating('targets', targets)
  checks.check_shape('targets', targets, jnp.shape(predictions), 'same as predictions')
  if jnp.ndim(predictions) == 0:
    raise ValueError('predictions: expected an array with a batch axis, got a scalar')
  squared = jnp.square(predictions - targets)
  per_example = squared.reshape(squared.shape[0], -1).mean(axis=1)
  return masked_mean(per_example, mask)


def l2_penalty(model: nnx.Module | Any) -> jax.Array:
  """Sum of squares of every ``nnx.Param`` in ``model`` (or of every array in a pytree).

  Only trainable parameters count: BatchNorm statistics, RNG counters and keys
  are state, not weights, and squaring a PRNG key raises. Multiply by your
  regularisation strength and add to the loss; or prefer decoupled weight
  decay (``optax.adamw``), which notebook 03 compares with this.

  Args:
    model: an NNX module; or a pytree of floating-point arrays (a dict of
      parameters, an ``nnx.State``), every array of which counts.

  Returns:
    A float32 scalar (0.0 for a module without parameters).

  Raises:
    TypeError: for a pytree that holds no arrays, or an array that is not
      floating-point (the message names its path).

  Example:
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> penalty = l2_penalty(model)
  """
  if isinstance(model, nnx.Module):
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
  else:
    flat = jax.tree_util.tree_flatten_with_path(model)[0]
    if not flat:
      raise TypeError(f'model: expected an nnx.Module or a pytree of float arrays, got {type(model).__name__} with no arrays')
    for path, leaf in flat:
      if not (hasattr(leaf, 'dtype') and jnp.issubdtype(leaf.dtype, jnp.floating)):
        raise TypeError(
            f'model: expected float arrays in the pytree, got {type(leaf).__name__} '
            f'{getattr(leaf, "dtype", "")} at {jax.tree_util.keystr(path)}'
        )
    params = [leaf for _, leaf in flat]
  return sum((jnp.sum(jnp.square(p.astype(jnp.float32))) for p in params), jnp.float32(0.0))
