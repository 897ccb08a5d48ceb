"""Evaluation: a jitted eval step in evaluation mode, and exact averages over a data set.

``make_eval_step(loss_fn)`` returns ``eval_step(model, batch) -> metrics``:
the loss and ``aux`` of a view of the model in evaluation mode (Dropout off,
BatchNorm on its running averages), plus ``count``, the number of real
examples in the batch. :func:`evaluate` runs it over every batch and
averages, weighting by ``count``.

Like the train step, the eval step is one ``jax.jit`` function over the
model's arrays with its structure as a static argument
(:func:`eval_arrays`), so it compiles once per structure and loss function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxtrain.losses import LossFn
from flaxtrain.losses import call_loss_fn
from flaxtrain.losses import check_loss_fn
from flaxtrain.parallel import DataParallel
from flaxtrain.parallel import as_parallel
from flaxtrain.steps import StepSpec
from flaxtrain.steps import TrainStep
from flaxtrain.steps import classification_loss

__all__ = [
    'EvalStep',
    'check_covers_its_data',
    'check_loss_respects_mask',
    'eval_arrays',
    'eval_view',
    'evaluate',
    'make_eval_step',
]

Batch = Mapping[str, Any]


def eval_view(model: nnx.Module) -> nnx.Module:
  """A view of ``model`` in evaluation mode, sharing its Variables.

  Dropout becomes the identity and BatchNorm uses its running averages. The
  original ``model`` keeps its own mode, so a training loop need not switch it
  back after validation.
  """
  return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


@functools.partial(jax.jit, static_argnames=('spec',))
def eval_arrays(arrays: list[jax.Array], batch: Batch, *, spec: StepSpec) -> dict[str, jax.Array]:
  """The compiled eval step over the arrays of an evaluation-mode view (``spec`` from its split)."""
  model = nnx.merge(spec.graphdef, jax.tree.unflatten(spec.treedef, arrays))
  loss, aux = call_loss_fn(spec.loss_fn, model, batch, reserved=('loss', 'count'))
  if 'mask' in batch:
    count = jnp.sum(batch['mask']).astype(jnp.float32)
  else:
    count = jnp.float32(len(jax.tree.leaves(batch)[0]))
  metrics = {'loss': loss, **aux, 'count': count}
  if spec.replicated is not None:
    metrics = jax.lax.with_sharding_constraint(metrics, spec.replicated)
  return metrics


class EvalStep:
  """The eval step that :func:`make_eval_step` returns: ``eval_step(model, batch) -> metrics``."""

  def __init__(self, loss_fn: LossFn, parallel: DataParallel | None = None):
    self.loss_fn = loss_fn
    self.parallel = parallel

  def bind(self, model: nnx.Module) -> Callable[[Batch], dict[str, jax.Array]]:
    """``batch -> metrics`` for ``model`` as it is now: split once, for a pass over many batches.

    The arrays are read from the model's Variables at every call, so
    training between calls is seen; a change of structure is not (bind again).
    """
    if not isinstance(model, nnx.Module):
      raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
    graphdef, state = nnx.split(eval_view(model))
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    replicated = self.parallel.replicated if self.parallel is not None else None
    spec = StepSpec(graphdef, jax.tree.structure(state), self.loss_fn, replicated=replicated)
    parallel = self.parallel

    def bound(batch: Batch) -> dict[str, jax.Array]:
      if parallel is not None:
        batch = parallel.shard_batch(batch)
      return eval_arrays([v.get_raw_value() for v in variables], batch, spec=spec)

    return bound

  def __call__(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """The metrics of ``model`` in evaluation mode on ``batch``; ``model`` is left unchanged."""
    return self.bind(model)(batch)


def make_eval_step(loss_fn: LossFn = classification_loss, *,
                   parallel: DataParallel | bool | None = None) -> EvalStep:
  """Returns ``eval_step(model, batch) -> metrics``, jitted, in evaluation mode.

  Args:
    loss_fn: the same ``loss_fn(model, batch) -> (loss, aux)`` as training.
    parallel: a :class:`flaxtrain.DataParallel` (or True for all devices):
      each batch is split over its devices (its size must be a multiple of
      the device count, padded batches included); None: one device.

  Returns:
    An :class:`EvalStep`: called as ``eval_step(model, batch)`` it leaves
    ``model`` unchanged and returns ``loss``, the keys of ``aux`` and
    ``count`` (the sum of ``batch['mask']``, or the batch size).

  Example:
    >>> eval_step = make_eval_step()
    >>> metrics = eval_step(model, batch)  # doctest: +SKIP
  """
  check_loss_fn(loss_fn)
  return EvalStep(loss_fn, as_parallel(parallel))


def check_covers_its_data(name: str, loader: Any) -> None:
  """Raises if ``loader`` is a DataLoader with ``remainder='drop'`` that would skip examples.

  Args:
    name: the argument's name for the message (``'val_loader'``, ``'batches'``).
    loader: anything; only a loader with ``remainder``, ``num_examples`` and
      ``batch_size`` attributes is checked.
  """
  if getattr(loader, 'remainder', None) != 'drop':
    return
  size, batch_size = getattr(loader, 'num_examples', None), getattr(loader, 'batch_size', None)
  if isinstance(size, int) and isinstance(batch_size, int) and size % batch_size:
    raise ValueError(
        f"{name}: remainder='drop' evaluates only {size // batch_size * batch_size} of its {size} "
        f"examples; build it with DataLoader(data, {batch_size}, shuffle=False, remainder='pad'), "
        'whose padded last batch carries a mask so every example counts once'
    )


def _perturb_padding(batch: Batch, pad: np.ndarray) -> dict[str, Any]:
  """A copy of ``batch`` whose padding rows (``pad``) hold other values."""
  changed = {}
  for key, value in batch.items():
    value = np.array(value)
    if key != 'mask' and value.ndim >= 1 and len(value) == len(pad):
      if np.issubdtype(value.dtype, np.floating):
        value[pad] = value[pad] + 1.0
      elif np.issubdtype(value.dtype, np.integer):
        value[pad] = np.where(value[pad] > 0, value[pad] - 1, value[pad] + 1)
    changed[key] = value
  return changed


def check_loss_respects_mask(step: Callable[[Batch], Mapping[str, Any]], batch: Batch, source: str) -> None:
  """Evaluates a padded ``batch`` twice, changing only the padding: no metric may change.

  Args:
    step: ``batch -> metrics`` (e.g. ``eval_step.bind(model)``).
    batch: a batch whose ``mask`` has zeros.
    source: the loader's name for the message.

  Raises:
    ValueError: naming ``loss_fn``, the metric that changed and both values.
  """
  pad = np.asarray(batch['mask']) == 0
  first, second = jax.device_get((step(batch), step(_perturb_padding(batch, pad))))
  for name in first:
    a, b = first[name], second[name]
    if not np.allclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True):
      raise ValueError(
          f"loss_fn: ignores batch['mask']: on a padded {source} batch ({int(pad.sum())} padding rows), "
          f'changing only the padding changed {name} from {float(a):.6g} to {float(b):.6g}, so evaluation '
          "would count the padding as examples. Weight per-example values with the mask, e.g. "
          "ft.softmax_cross_entropy_with_integer_labels(logits, labels, batch.get('mask')) and "
          "ft.accuracy(logits, labels, batch.get('mask'))"
      )


def evaluate(
    eval_step: Callable[..., Mapping[str, jax.Array]],
    model: nnx.Module,
    batches: Iterable[Batch],
    *,
    parallel: DataParallel | bool | None = None,
    check_mask: bool = True,
) -> dict[str, float]:
  """Runs ``eval_step`` over ``batches`` and averages, weighting by ``count``.

  The per-batch metrics stay on the device until the end, then come back in
  one transfer.

  Args:
    eval_step: from :func:`make_eval_step` (or any ``eval_step(model, batch)``
      returning scalar metrics and ``count``).
    model: the model to evaluate.
    batches: an iterable of batches (padded batches carry a ``mask``); a
      :class:`flaxtrain.DataLoader` must not drop examples.
    parallel: a :class:`flaxtrain.DataParallel` (or True for all devices) to
      split each batch over; None leaves the batches as they are (an
      ``eval_step`` made with ``parallel=`` splits them itself).
    check_mask: on the first padded batch, evaluate a second time with only
      the padding changed and raise if any metric moved (a ``loss_fn`` that
      ignores ``batch['mask']``).

  Returns:
    ``{name: mean}`` as Python floats, plus ``count``, the examples seen.
    ``accuracy`` is exact: each batch's accuracy times its count is rounded
    to the whole number of correct predictions it stands for, and the sum of
    those integers is divided by the number of examples, so two evaluations
    with the same number of correct predictions give the same float (357
    correct out of 360 is ``357 / 360`` whatever the batching).

  Raises:
    TypeError: ``eval_step`` is a train step, or not callable.
    ValueError: ``batches`` is empty, drops examples, or its ``loss_fn``
      ignores the mask.
  """
  if isinstance(eval_step, TrainStep):
    raise TypeError('eval_step: expected an eval step from ft.make_eval_step(loss_fn), got a train step '
                    '(make_train_step), which would train the model on the evaluation data')
  if not callable(eval_step):
    raise TypeError(f'eval_step: expected eval_step(model, batch) -> metrics, got {type(eval_step).__name__}')
  check_covers_its_data('batches', batches)
  parallel = as_parallel(parallel)
  step = eval_step.bind(model) if isinstance(eval_step, EvalStep) else functools.partial(eval_step, model)
  results, checked = [], not check_mask
  for batch in batches:
    if parallel is not None:
      batch = parallel.shard_batch(batch)
    if not checked and isinstance(batch, Mapping) and 'mask' in batch and np.any(np.asarray(batch['mask']) == 0):
      check_loss_respects_mask(step, batch, 'batches')
      checked = True
    results.append(step(batch))
  if not results:
    raise ValueError('batches: expected at least one batch, got an empty iterable')
  results = jax.device_get(results)
  counts = np.array([r['count'] for r in results], dtype=np.float64)
  total = counts.sum()
  summary = {
      name: float(np.dot(counts, [r[name] for r in results]) / max(total, 1.0))
      for name in results[0] if name not in ('count', 'accuracy')
  }
  if 'accuracy' in results[0]:
    summary['accuracy'] = _exact_accuracy(counts, np.array([r['accuracy'] for r in results], np.float64))
  summary['count'] = float(total)
  return summary


def _exact_accuracy(counts: np.ndarray, accuracies: np.ndarray) -> float:
  """Correct predictions over examples, from per-batch float32 accuracies and counts.

  Falls back to the count-weighted mean when the numbers are not counts
  (fractional mask weights, or an ``accuracy`` that is not a fraction of
  examples).
  """
  correct = counts * accuracies  # a whole number up to float32 rounding (relative 6e-8)
  whole = np.rint(correct)
  if np.all(counts == np.rint(counts)) and np.all(np.abs(correct - whole) <= 1e-6 * np.maximum(counts, 1)):
    return int(whole.sum()) / max(int(counts.sum()), 1)
  return float(correct.sum() / max(counts.sum(), 1.0))
