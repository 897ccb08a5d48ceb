"""What ``fit`` checks before the first step: arguments, loaders, batches, labels and the mask.

Every check here fails before any training, with an error that names the
argument or loader, what was expected and what was given. The checks that
trace ``loss_fn`` go through the compiled train and eval steps'
``eval_shape``, so JAX traces them once per structure: a second ``fit`` on
a model of the same structure traces nothing again.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from flaxtrain import checks
from flaxtrain.evaluation import check_covers_its_data
from flaxtrain.evaluation import check_loss_respects_mask
from flaxtrain.evaluation import eval_arrays
from flaxtrain.evaluation import eval_view
from flaxtrain.losses import LossFn
from flaxtrain.parallel import DataParallel
from flaxtrain.steps import RESERVED
from flaxtrain.steps import StepSpec
from flaxtrain.steps import TrainState
from flaxtrain.steps import classification_loss
from flaxtrain.steps import metric_names

__all__ = [
    'check_best_metric',
    'check_data',
    'check_fit_arguments',
    'check_parallel_loaders',
    'fingerprint',
    'skips_nonfinite',
    'val_batches',
]


def skips_nonfinite(state: Any) -> bool:
  """True if an optax state contains an ``apply_if_finite`` state."""
  if isinstance(state, optax.ApplyIfFiniteState):
    return True
  if isinstance(state, (tuple, list)):  # chain states and NamedTuple states
    return any(skips_nonfinite(child) for child in state)
  return False


def fingerprint(loader: Any) -> dict[str, Any]:
  """What must not change between a run and its resumption for the data order to match."""
  found = {'batches_per_epoch': len(loader)}
  for name in ('num_examples', 'batch_size', 'seed', 'shuffle'):
    value = getattr(loader, name, None)
    if isinstance(value, (bool, int, float, str)):
      found[name] = value
  return found


def check_fit_arguments(
    model: Any, optimizer: Any, train_loader: Any, epochs: Any, val_loader: Any, loss_fn: Any,
    checkpoint_dir: Any, checkpoint_every: Any, best_metric: Any, best_mode: Any, log_every: Any,
    on_nonfinite: Any, keep: Any, resume: Any, accept_new_hyperparams: Any, steps_per_dispatch: Any,
) -> None:
  """Raises, naming the argument, before anything runs on a device."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        f'optimizer: expected an nnx.Optimizer(model, tx, wrt=nnx.Param), got {type(optimizer).__name__}')
  if not callable(getattr(train_loader, 'epoch', None)) or not hasattr(train_loader, '__len__'):
    raise TypeError(
        'train_loader: expected a flaxtrain.DataLoader (or an object with len() and '
        f'.epoch(epoch, start)), got {type(train_loader).__name__}')
  if len(train_loader) == 0:
    raise ValueError('train_loader: expected at least one batch per epoch, got 0')
  checks.check_int('epochs', epochs)
  if val_loader is not None:
    if not isinstance(val_loader, Iterable):
      raise TypeError(f'val_loader: expected a DataLoader or a list of batches, got {type(val_loader).__name__}')
    if not hasattr(val_loader, 'epoch') and iter(val_loader) is val_loader:
      raise TypeError(
          'val_loader: expected something that can be iterated every epoch (a DataLoader or '
          f'a list of batches), got a one-shot iterator {type(val_loader).__name__}')
  if not callable(loss_fn):
    raise TypeError(f'loss_fn: expected a callable loss_fn(model, batch) -> (loss, aux), got {loss_fn!r}')
  if checkpoint_dir is not None:
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
      raise TypeError(f'checkpoint_dir: expected a path or None, got {type(checkpoint_dir).__name__}')
    if not os.fspath(checkpoint_dir).strip():
      raise ValueError("checkpoint_dir: expected a directory path or None, got an empty path '' (which would "
                       "write into the current directory); pass e.g. 'runs/my_run'")
  if checkpoint_every is not None:
    checks.check_int('checkpoint_every', checkpoint_every)
  if best_metric is not None and not isinstance(best_metric, str):
    raise TypeError(f"best_metric: expected a metric name such as 'val_accuracy', or None, got {best_metric!r}")
  if best_mode not in ('max', 'min'):
    raise ValueError(f"best_mode: expected 'max' or 'min', got {best_mode!r}")
  checks.check_int('log_every', log_every)
  checks.check_int('steps_per_dispatch', steps_per_dispatch)
  if on_nonfinite not in (None, 'raise', 'skip'):
    raise ValueError(f"on_nonfinite: expected None, 'raise' or 'skip', got {on_nonfinite!r}")
  if on_nonfinite == 'skip' and not skips_nonfinite(optimizer.opt_state):
    raise ValueError(
        "on_nonfinite: 'skip' needs an optimizer that skips non-finite updates itself, i.e. a tx "
        'wrapped in optax.apply_if_finite(tx, max_consecutive_errors) (make_optimizer(..., '
        'skip_nonfinite=n) builds one); got an optimizer without it, whose bad updates would '
        'already be applied')
  checks.check_int('keep', keep)
  for name, value in (('resume', resume), ('accept_new_hyperparams', accept_new_hyperparams)):
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f'{name}: expected True or False, got {value!r}')
  if accept_new_hyperparams and checkpoint_dir is None:
    raise ValueError('accept_new_hyperparams: only applies when resuming from a checkpoint_dir, got checkpoint_dir=None')


def _batch_keys(batch: Mapping[str, Any]) -> str:
  return '{' + ', '.join(f'{k!r}: {np.shape(v)}' for k, v in batch.items()) + '}'


def _eval_spec(model: nnx.Module, loss_fn: Any) -> tuple[StepSpec, list[Any]]:
  graphdef, state = nnx.split(eval_view(model))
  return StepSpec(graphdef, jax.tree.structure(state), loss_fn), jax.tree.leaves(state)


def _traced(source: str, loss_fn: LossFn, batch: Any, trace: Callable[[], Any]) -> Any:
  """``trace()``, which traces ``loss_fn`` on ``batch`` (shapes only); its errors name ``source`` and the batch."""
  if not isinstance(batch, Mapping):
    shown = f'a {type(batch).__name__} of {len(batch)}' if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise TypeError(
        f"{source}: expected batches that are dicts such as {{'image': ..., 'label': ...}}, got {shown}; "
        "build the loader from a dict: DataLoader({'image': x, 'label': y}, batch_size)")
  expected = " (classification_loss reads 'image' and integer 'label', and 'mask' if present)" \
      if loss_fn is classification_loss else ''
  try:
    return trace()
  except KeyError as error:
    raise ValueError(
        f'{source}: loss_fn reads batch[{error.args[0]!r}], but the batches hold {_batch_keys(batch)}{expected}'
    ) from error
  except (TypeError, ValueError) as error:
    if str(error).startswith('loss_fn:'):  # the (loss, aux) contract: its own message
      raise
    first = str(error).strip().splitlines()[0] if str(error).strip() else ''
    raise ValueError(
        f'{source}: a batch {_batch_keys(batch)} does not fit model and loss_fn{expected}: '
        f'{type(error).__name__}: {first}') from error
  except IndexError as error:
    raise ValueError(f'{source}: a batch {_batch_keys(batch)} does not fit model and loss_fn{expected}: '
                     f'IndexError: {error}') from error


def _trace_loss(spec: StepSpec, arrays: list[Any], loss_fn: LossFn, batch: Any, source: str) -> list[str]:
  """Traces loss_fn on ``batch`` in evaluation mode (shapes only); returns the aux names."""
  out = _traced(source, loss_fn, batch, lambda: eval_arrays.eval_shape(arrays, batch, spec=spec))
  return [name for name in out if name not in ('loss', 'count')]


def _num_classes(spec: StepSpec, arrays: list[Any], batch: Mapping[str, Any]) -> int:
  logits_spec = StepSpec(spec.graphdef, spec.treedef, None, structure=spec.structure)
  return int(_logits.eval_shape(arrays, batch['image'], spec=logits_spec).shape[-1])


@functools.partial(jax.jit, static_argnames=('spec',))
def _logits(arrays: list[Any], images: Any, *, spec: StepSpec) -> jax.Array:
  """The model's outputs on ``images`` (only its ``eval_shape`` is used: one trace per structure).

  ``spec`` is that of a train state: the model comes first in ``(model, optimizer)``.
  """
  model, _ = nnx.merge(spec.graphdef, jax.tree.unflatten(spec.treedef, arrays))
  return model(images)


def _check_labels(labels: Any, mask: Any, num_classes: int, source: str) -> None:
  """Integer labels must be class indices in [0, num_classes) wherever mask is non-zero."""
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    return  # classification_loss reports the dtype when it traces
  real = labels if mask is None else labels[np.asarray(mask) != 0]
  bad = real[(real < 0) | (real >= num_classes)]
  if bad.size:
    raise ValueError(
        f'{source}: labels must be class indices in [0, {num_classes}) for a model with {num_classes} '
        f'outputs; found {bad.size} outside it, e.g. {sorted(set(bad.tolist()))[:5]}')


def val_batches(val_loader: Any) -> Iterable[Mapping[str, Any]]:
  """One pass over ``val_loader``: a DataLoader's epoch 0, or the list itself."""
  return val_loader.epoch(0) if hasattr(val_loader, 'epoch') else val_loader


def _signature(batch: Any) -> Any:
  if not isinstance(batch, Mapping):
    return None
  return tuple(sorted((k, np.shape(v), str(getattr(v, 'dtype', type(v).__name__))) for k, v in batch.items()))


def check_data(state: TrainState, loss_fn: LossFn, train_loader: Any, val_loader: Any, eval_step: Any,
               first: Any, loss_scale: Any) -> list[str]:
  """Checks, before any training, that the batches fit the model and loss_fn; returns the step's metric names.

  The first training batch is traced through the train step itself (shapes
  only: JAX traces it once per structure, and the names of its metrics come
  from the same trace), every distinct shape of validation batch through
  the evaluation step; with the default loss, labels are checked on the host
  against the number of outputs; a padded validation batch is evaluated
  twice to check that loss_fn honours its mask.

  Args:
    state: the :class:`flaxtrain.steps.TrainState` of ``(model, optimizer)``.
    loss_fn, train_loader, val_loader: as given to ``fit``.
    eval_step: the evaluation step ``fit`` validates with.
    first: the first batch of ``train_loader.epoch(0)``.
    loss_scale: as given to ``fit``.

  Returns:
    The names of the train step's metrics, sorted (the order the step packs them in).
  """
  model = state.model
  names = _traced('train_loader', loss_fn, first, lambda: metric_names(state, first, loss_scale))
  aux = sorted(name for name in names if name not in RESERVED)
  classify = loss_fn is classification_loss
  num_classes = _num_classes(state.spec, state.read(), first) if classify else None
  data = getattr(train_loader, 'data', None)
  if classify and isinstance(data, Mapping) and 'label' in data:
    _check_labels(data['label'], None, num_classes, 'train_loader')
  for name, loader in (('train_loader', train_loader), ('val_loader', val_loader)):
    check_vocab = getattr(loader, 'check_vocab_size', None)  # a TextLoader: ids below the model's vocabulary
    if callable(check_vocab) and isinstance(getattr(model, 'vocab_size', None), int):
      check_vocab(model.vocab_size, name=name)
  if val_loader is None:
    return names
  check_covers_its_data('val_loader', val_loader)
  spec, arrays = _eval_spec(model, loss_fn)  # validation runs in evaluation mode: trace it so
  seen, padded = set(), None
  for batch in val_batches(val_loader):
    signature = _signature(batch)
    if signature not in seen:
      seen.add(signature)
      val_aux = _trace_loss(spec, arrays, loss_fn, batch, 'val_loader')
      if sorted(val_aux) != aux:
        raise ValueError(f'val_loader: loss_fn returns aux {val_aux} on its batches but {aux} on training batches')
    if classify and 'label' in batch:
      _check_labels(batch['label'], batch.get('mask'), num_classes, 'val_loader')
    if padded is None and 'mask' in batch and np.any(np.asarray(batch['mask']) == 0):
      padded = batch
  if padded is not None:
    check_loss_respects_mask(eval_step.bind(model), padded, 'val_loader')
  return names


def check_parallel_loaders(parallel: DataParallel | None, train_loader: Any, val_loader: Any) -> None:
  """Raises, naming the loader and both numbers, if a batch size does not split over the devices."""
  if parallel is None:
    return
  for name, loader in (('train_loader', train_loader), ('val_loader', val_loader)):
    batch_size = getattr(loader, 'batch_size', None)
    if isinstance(batch_size, int) and batch_size % parallel.num_devices:
      raise ValueError(
          f'{name}: batch_size {batch_size} is not divisible by the {parallel.num_devices} devices of '
          f'parallel (mesh axis {parallel.axis!r}); every batch, padded ones included, is split evenly '
          f'over the devices: use a multiple of {parallel.num_devices}')
    if isinstance(loader, Sequence):  # a list of batches
      for index, batch in enumerate(loader):
        parallel.check_batch(batch, name=f'{name}[{index}]')


def check_best_metric(names: list[str], best_metric: str, has_val: bool) -> None:
  """Checks that ``best_metric`` will be recorded, given the aux names loss_fn returns."""
  names = ['loss', *names]
  available = [f'train_{n}' for n in (*names, 'grad_norm')] + ([f'val_{n}' for n in names] if has_val else [])
  if best_metric not in available:
    raise ValueError(
        f'best_metric: expected one of the epoch metrics {available}, got {best_metric!r}'
        + ('' if has_val else ' (pass a val_loader for val_ metrics, or best_metric=None)'))
