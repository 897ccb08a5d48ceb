"""Jitted train and eval steps built from a user's ``loss_fn``.

A loss function has the signature ``loss_fn(model, batch) -> (loss, aux)``:
``loss`` is a scalar and ``aux`` a dict of scalar metrics computed in the same
forward pass (``has_aux=True``). The factories here turn it into

* ``train_step(model, optimizer, batch) -> metrics``: gradients with
  ``nnx.value_and_grad``, the update with ``optimizer.update(model, grads)``,
  in place; metrics hold ``loss``, ``grad_norm`` (the global norm of the raw
  gradients, *before* any clipping in the optimizer), ``learning_rate`` (the
  rate this update used, when the optimizer was built with
  ``optax.inject_hyperparams``) and everything in ``aux``.
* ``eval_step(model, batch) -> metrics``: the loss on a view of the model in
  evaluation mode (Dropout off, BatchNorm on its running averages), plus
  ``count``, the number of real examples in the batch.

The metrics stay on the device; pull them off only when you log them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxtrain.losses import softmax_cross_entropy_with_integer_labels
from flaxtrain.metrics import accuracy

__all__ = [
    'LossFn',
    'classification_loss',
    'current_learning_rate',
    'make_train_step',
    'make_eval_step',
    'eval_view',
    'evaluate',
]

Batch = Mapping[str, Any]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, Mapping[str, jax.Array]]]


def classification_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy and accuracy of ``model`` on ``{'image', 'label'[, 'mask']}``.

  Args:
    model: maps ``batch['image']`` to logits ``(batch, num_classes)``.
    batch: dict with ``image``, integer ``label`` and optionally ``mask``
      (1 for real examples, 0 for padding).

  Returns:
    ``(loss, {'accuracy': accuracy})``.
  """
  logits = model(batch['image'])
  mask = batch.get('mask')
  loss = softmax_cross_entropy_with_integer_labels(logits, batch['label'], mask)
  return loss, {'accuracy': accuracy(logits, batch['label'], mask)}


def _check_loss_fn(loss_fn: Any) -> None:
  if not callable(loss_fn):
    raise TypeError(f'loss_fn: expected a callable loss_fn(model, batch) -> (loss, aux), got {loss_fn!r}')


def _check_loss_output(loss: Any, aux: Any, reserved: tuple[str, ...]) -> None:
  """Checks, at trace time, that loss_fn returned a scalar and a dict of scalars."""
  if jnp.shape(loss) != ():
    raise ValueError(f'loss_fn: expected a scalar loss, got shape {jnp.shape(loss)}')
  if not isinstance(aux, Mapping):
    raise TypeError(f'loss_fn: expected aux to be a dict of scalar metrics, got {type(aux).__name__}')
  for name, value in aux.items():
    if name in reserved:
      raise ValueError(f'loss_fn: aux key {name!r} is reserved by the step (reserved: {reserved})')
    if jnp.shape(value) != ():
      raise ValueError(f'loss_fn: aux[{name!r}] must be a scalar, got shape {jnp.shape(value)}')


def current_learning_rate(optimizer: nnx.Optimizer) -> jax.Array | None:
  """The learning rate held in ``optimizer``'s state, or None if it holds none.

  Optax keeps the learning rate in the state only when the transformation was
  wrapped in ``optax.inject_hyperparams``; then, after each update, the state
  holds the rate that update used. The search looks through ``optax.chain``
  and nested states and returns the first ``learning_rate`` it finds.

  Args:
    optimizer: an ``nnx.Optimizer``.

  Returns:
    A scalar array, or None.

  Example:
    >>> tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # doctest: +SKIP
    >>> current_learning_rate(optimizer)                      # doctest: +SKIP
    Array(0.001, dtype=float32)
  """
  def search(state: Any) -> Any:
    hyperparams = getattr(state, 'hyperparams', None)
    if isinstance(hyperparams, Mapping) and 'learning_rate' in hyperparams:
      return hyperparams['learning_rate']
    if isinstance(state, (tuple, list)):  # chain states and NamedTuple states
      for child in state:
        found = search(child)
        if found is not None:
          return found
    return None

  found = search(optimizer.opt_state)
  if isinstance(found, nnx.Variable):
    found = found.get_value()
  return None if found is None else jnp.asarray(found)


def make_train_step(loss_fn: LossFn = classification_loss) -> Callable[..., dict[str, jax.Array]]:
  """Returns ``train_step(model, optimizer, batch) -> metrics``, jitted.

  Args:
    loss_fn: ``loss_fn(model, batch) -> (loss, aux)``; the model and the
      batch are arguments, never captured, so each call trains on the batch it
      is given.

  Returns:
    A function that updates ``model`` and ``optimizer`` in place and returns
    a dict of scalar device arrays: ``loss``, ``grad_norm``,
    ``learning_rate`` (if the optimizer state holds one) and the keys of
    ``aux``.

  Example:
    >>> train_step = make_train_step()
    >>> metrics = train_step(model, optimizer, batch)  # doctest: +SKIP
  """
  _check_loss_fn(loss_fn)
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)

  @nnx.jit
  def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> dict[str, jax.Array]:
    (loss, aux), grads = grad_fn(model, batch)
    _check_loss_output(loss, aux, reserved=('loss', 'grad_norm', 'learning_rate'))
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    metrics = {'loss': loss, 'grad_norm': grad_norm}
    learning_rate = current_learning_rate(optimizer)
    if learning_rate is not None:
      metrics['learning_rate'] = learning_rate
    return {**metrics, **aux}

  return train_step


def eval_view(model: nnx.Module) -> nnx.Module:
  """A view of ``model`` in evaluation mode, sharing its arrays.

  Dropout becomes the identity and BatchNorm uses its running averages. The
  original ``model`` keeps its own mode, so a training loop need not switch it
  back after validation.
  """
  return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


def make_eval_step(loss_fn: LossFn = classification_loss) -> Callable[..., dict[str, jax.Array]]:
  """Returns ``eval_step(model, batch) -> metrics``, jitted, in evaluation mode.

  Args:
    loss_fn: the same ``loss_fn(model, batch) -> (loss, aux)`` as training.

  Returns:
    A function that leaves ``model`` unchanged and returns ``loss``, the keys
    of ``aux`` and ``count`` (the sum of ``batch['mask']``, or the batch size).
  """
  _check_loss_fn(loss_fn)

  @nnx.jit
  def eval_step(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    loss, aux = loss_fn(eval_view(model), batch)
    _check_loss_output(loss, aux, reserved=('loss', 'count'))
    if 'mask' in batch:
      count = jnp.sum(batch['mask']).astype(jnp.float32)
    else:
      count = jnp.float32(len(jax.tree.leaves(batch)[0]))
    return {'loss': loss, **aux, 'count': count}

  return eval_step


def evaluate(
    eval_step: Callable[..., Mapping[str, jax.Array]],
    model: nnx.Module,
    batches: Iterable[Batch],
) -> dict[str, float]:
  """Runs ``eval_step`` over ``batches`` and averages, weighting by ``count``.

  The per-batch metrics stay on the device until the end, then come back in
  one transfer.

  Args:
    eval_step: from :func:`make_eval_step`.
    model: the model to evaluate.
    batches: an iterable of batches (padded batches carry a ``mask``).

  Returns:
    ``{name: mean}`` as Python floats, plus ``count``, the examples seen.

  Raises:
    ValueError: if ``batches`` is empty.
  """
  results = [eval_step(model, batch) for batch in batches]
  if not results:
    raise ValueError('batches: expected at least one batch, got an empty iterable')
  results = jax.device_get(results)
  counts = np.array([r['count'] for r in results], dtype=np.float64)
  total = counts.sum()
  summary = {
      name: float(np.dot(counts, [r[name] for r in results]) / max(total, 1.0))
      for name in results[0] if name != 'count'
  }
  summary['count'] = float(total)
  return summary
