"""fit(): the whole training loop, built from flaxtrain's public pieces.

``fit`` is the loop of the notebooks with the chores done carefully, not a
framework: it trains with :func:`flaxtrain.make_train_step`, validates with
:func:`flaxtrain.make_eval_step` and :func:`flaxtrain.evaluate`, records a
:class:`flaxtrain.History` and writes :class:`flaxtrain.Checkpoints`. What it
adds is what breaks when done in a hurry:

* **Few syncs.** Step metrics stay on the device and come back in one
  transfer every ``log_every`` steps (and at the end of each epoch), where the
  progress bar is updated and the losses are checked for NaN and inf.
  Between those, a step costs what a hand-written ``jax.jit`` step costs:
  the train step keeps no per-step Python work beyond the call, and
  ``steps_per_dispatch=K`` runs K steps per call to the device.
* **Exact resume.** A checkpoint holds the model (RNG state included), the
  optimizer, the step, the position in the data (epoch, batch) and the
  history. Since the data order of an epoch depends only on the loader's seed
  and the epoch, a resumed run sees the same batches and draws the same
  Dropout masks: training 2N epochs in two calls of N gives the same
  parameters, bit for bit, as one call of 2N.
* **Ctrl-C is safe.** A KeyboardInterrupt returns the history so far; the
  last complete checkpoint stays on disk, and calling ``fit`` again resumes
  from it.
* **Non-finite losses stop the run** with an error naming the first bad step
  and the last good checkpoint, unless the optimizer skips bad updates
  (``optax.apply_if_finite``) and the run is told to go on.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.std import tqdm

from flaxtrain import _checks
from flaxtrain.checkpoint import CheckpointError
from flaxtrain.checkpoint import Checkpoints
from flaxtrain.history import History
from flaxtrain.history import HistoryLog
from flaxtrain.live import LivePlot
from flaxtrain.live import as_live_plot
from flaxtrain.live import progress_bar
from flaxtrain.steps import LossFn
from flaxtrain.steps import classification_loss
from flaxtrain.steps import eval_view
from flaxtrain.steps import evaluate
from flaxtrain.steps import make_eval_step
from flaxtrain.steps import _make_packed_train_step
from flaxtrain.steps import _split_batches
from flaxtrain.steps import stack_batches
from flaxtrain.parallel import DataParallel
from flaxtrain.parallel import as_parallel
from flaxtrain.steps import _snapshot
from flaxtrain import precision

__all__ = ['fit']

_FORMAT = 2  # version of the metadata fit() stores in a checkpoint


def _skips_nonfinite(state: Any) -> bool:
  """True if an optax state contains an ``apply_if_finite`` state."""
  if isinstance(state, optax.ApplyIfFiniteState):
    return True
  if isinstance(state, (tuple, list)):  # chain states and NamedTuple states
    return any(_skips_nonfinite(child) for child in state)
  return False


def _fingerprint(loader: Any) -> dict[str, Any]:
  """What must not change between a run and its resumption for the data order to match."""
  found = {'batches_per_epoch': len(loader)}
  for name in ('num_examples', 'batch_size', 'seed', 'shuffle'):
    value = getattr(loader, name, None)
    if isinstance(value, (bool, int, float, str)):
      found[name] = value
  return found


def _check_arguments(
    model: Any, optimizer: Any, train_loader: Any, epochs: Any, val_loader: Any, loss_fn: Any,
    checkpoint_dir: Any, checkpoint_every: Any, best_metric: Any, best_mode: Any,
    log_every: Any, on_nonfinite: Any,
) -> None:
  """Raises, naming the argument, before anything runs on a device."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        f'optimizer: expected an nnx.Optimizer(model, tx, wrt=nnx.Param), got {type(optimizer).__name__}'
    )
  if not callable(getattr(train_loader, 'epoch', None)) or not hasattr(train_loader, '__len__'):
    raise TypeError(
        'train_loader: expected a flaxtrain.DataLoader (or an object with len() and '
        f'.epoch(epoch, start)), got {type(train_loader).__name__}'
    )
  if len(train_loader) == 0:
    raise ValueError('train_loader: expected at least one batch per epoch, got 0')
  _checks.check_int('epochs', epochs)
  if val_loader is not None:
    if not isinstance(val_loader, Iterable):
      raise TypeError(f'val_loader: expected a DataLoader or a list of batches, got {type(val_loader).__name__}')
    if not hasattr(val_loader, 'epoch') and iter(val_loader) is val_loader:
      raise TypeError(
          'val_loader: expected something that can be iterated every epoch (a DataLoader or '
          f'a list of batches), got a one-shot iterator {type(val_loader).__name__}'
      )
  if not callable(loss_fn):
    raise TypeError(f'loss_fn: expected a callable loss_fn(model, batch) -> (loss, aux), got {loss_fn!r}')
  if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
    raise TypeError(f'checkpoint_dir: expected a path or None, got {type(checkpoint_dir).__name__}')
  if checkpoint_every is not None:
    _checks.check_int('checkpoint_every', checkpoint_every)
  if best_metric is not None and not isinstance(best_metric, str):
    raise TypeError(f"best_metric: expected a metric name such as 'val_accuracy', or None, got {best_metric!r}")
  if best_mode not in ('max', 'min'):
    raise ValueError(f"best_mode: expected 'max' or 'min', got {best_mode!r}")
  _checks.check_int('log_every', log_every)
  if on_nonfinite not in (None, 'raise', 'skip'):
    raise ValueError(f"on_nonfinite: expected None, 'raise' or 'skip', got {on_nonfinite!r}")
  if on_nonfinite == 'skip' and not _skips_nonfinite(optimizer.opt_state):
    raise ValueError(
        "on_nonfinite: 'skip' needs an optimizer that skips non-finite updates itself, i.e. a tx "
        'wrapped in optax.apply_if_finite(tx, max_consecutive_errors) (make_optimizer(..., '
        'skip_nonfinite=n) builds one); got an optimizer without it, whose bad updates would '
        'already be applied'
    )


def _check_checkpoint_arguments(checkpoint_dir: Any, keep: Any, resume: Any, accept_new_hyperparams: Any) -> None:
  """Raises, naming the argument, for the checkpoint options of fit()."""
  _checks.check_int('keep', keep)
  for name, value in (('resume', resume), ('accept_new_hyperparams', accept_new_hyperparams)):
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f'{name}: expected True or False, got {value!r}')
  if accept_new_hyperparams and checkpoint_dir is None:
    raise ValueError('accept_new_hyperparams: only applies when resuming from a checkpoint_dir, got checkpoint_dir=None')


def _batch_keys(batch: Mapping[str, Any]) -> str:
  return '{' + ', '.join(f'{k!r}: {np.shape(v)}' for k, v in batch.items()) + '}'


def _trace_loss(model: nnx.Module, loss_fn: LossFn, batch: Any, source: str) -> list[str]:
  """Traces loss_fn on ``batch`` (shapes only, no device work); returns the aux names.

  Raises a ValueError or TypeError that names ``source`` (the loader) and what
  did not fit, keeping the underlying error as its cause.
  """
  if not isinstance(batch, Mapping):
    shown = f'a {type(batch).__name__} of {len(batch)}' if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise TypeError(
        f"{source}: expected batches that are dicts such as {{'image': ..., 'label': ...}}, got {shown}; "
        "build the loader from a dict: DataLoader({'image': x, 'label': y}, batch_size)"
    )
  expected = " (classification_loss reads 'image' and integer 'label', and 'mask' if present)" \
      if loss_fn is classification_loss else ''
  try:
    out = nnx.eval_shape(loss_fn, eval_view(model), batch)
  except KeyError as error:
    raise ValueError(
        f'{source}: loss_fn reads batch[{error.args[0]!r}], but the batches hold {_batch_keys(batch)}{expected}'
    ) from error
  except (ValueError, TypeError, IndexError) as error:  # the model or loss_fn rejected the batch
    first = str(error).strip().splitlines()[0] if str(error).strip() else ''
    raise ValueError(
        f'{source}: a batch {_batch_keys(batch)} does not fit model and loss_fn{expected}: '
        f'{type(error).__name__}: {first}'
    ) from error
  if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
    raise TypeError(
        'loss_fn: expected loss_fn(model, batch) -> (loss, aux), a scalar loss and a dict of scalar '
        f'metrics (aux may be {{}}), got {type(out).__name__} {jax.tree.map(jnp.shape, out)!r:.100}'
    )
  if jnp.shape(out[0]) != ():
    raise ValueError(
        f'loss_fn: expected a scalar loss (the mean over the batch), got shape {jnp.shape(out[0])}'
    )
  return list(out[1])


def _val_batches(val_loader: Any) -> Iterable[Mapping[str, Any]]:
  return val_loader.epoch(0) if hasattr(val_loader, 'epoch') else val_loader


def _check_val_loader_covers_its_data(val_loader: Any) -> None:
  """A val DataLoader with remainder='drop' would silently evaluate only part of its examples."""
  if getattr(val_loader, 'remainder', None) != 'drop':
    return
  size, batch_size = getattr(val_loader, 'num_examples', None), getattr(val_loader, 'batch_size', None)
  if isinstance(size, int) and isinstance(batch_size, int) and size % batch_size:
    raise ValueError(
        f"val_loader: remainder='drop' evaluates only {len(val_loader) * batch_size} of its {size} "
        f"examples; build it with DataLoader(data, {batch_size}, shuffle=False, remainder='pad'), "
        'whose padded last batch carries a mask so every example counts once'
    )


def _num_classes(model: nnx.Module, batch: Mapping[str, Any]) -> int:
  return int(nnx.eval_shape(lambda m, x: m(x), eval_view(model), batch['image']).shape[-1])


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
        f'outputs; found {bad.size} outside it, e.g. {sorted(set(bad.tolist()))[:5]}'
    )


def _perturb_padding(batch: Mapping[str, Any], pad: np.ndarray) -> dict[str, Any]:
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


def _check_loss_respects_mask(model: nnx.Module, eval_step: Any, batch: Mapping[str, Any]) -> None:
  """Evaluates a padded batch twice, changing only the padding: no metric may change.

  It uses fit's own eval step, so validation later reuses its compilation.
  """
  pad = np.asarray(batch['mask']) == 0
  first, second = jax.device_get((eval_step(model, batch), eval_step(model, _perturb_padding(batch, pad))))
  for name in first:
    a, b = first[name], second[name]
    if not np.allclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True):
      raise ValueError(
          f"loss_fn: ignores batch['mask']: on a padded val_loader batch ({int(pad.sum())} padding rows), "
          f'changing only the padding changed {name} from {float(a):.6g} to {float(b):.6g}, so validation '
          "would count the padding as examples. Weight per-example values with the mask, e.g. "
          "ft.softmax_cross_entropy_with_integer_labels(logits, labels, batch.get('mask')) and "
          "ft.accuracy(logits, labels, batch.get('mask'))"
      )


# Results of the shape-only checks below, from earlier fit() calls: model id and
# what was checked -> (weak reference to the model, its graph's containers,
# shallow copies of them, result). See _memoized.
_CHECKED: dict[tuple[Any, ...], tuple[Any, Any, Any, Any]] = {}
_CHECKED_SIZE = 64


# One eval step per loss_fn, so that calling fit() again does not compile validation again.
_EVAL_STEPS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _eval_step(loss_fn: LossFn) -> Any:
  """``make_eval_step(loss_fn)``, made once per loss_fn and reused by later fit() calls."""
  try:
    return _EVAL_STEPS[loss_fn]
  except (KeyError, TypeError):  # TypeError: a loss_fn that cannot be weakly referenced
    eval_step = make_eval_step(loss_fn)
    try:
      _EVAL_STEPS[loss_fn] = eval_step
    except TypeError:
      pass
    return eval_step


def _signature(batch: Mapping[str, Any]) -> tuple[Any, ...]:
  """The keys, shapes and dtypes of a batch: all that a shape-only check depends on."""
  return tuple(sorted((k, np.shape(v), str(getattr(v, 'dtype', type(v).__name__))) for k, v in batch.items()))


def _memoized(model: nnx.Module, key: tuple[Any, ...], compute: Any) -> Any:
  """``compute()``, or its result from an earlier fit() call on the same, unchanged model.

  The checks memoized here trace ``loss_fn`` with ``nnx.eval_shape`` (a few
  milliseconds each) and depend only on the model's structure, ``loss_fn`` and
  the batch's keys, shapes and dtypes, never on values. Calling fit() again on
  an unchanged model (the usual notebook pattern) skips them; a model whose
  graph changed since (a layer replaced, ``model.eval()``, a list appended to)
  is checked afresh, with the same C-level comparison the train step uses.
  Errors are never memoized.
  """
  full_key = (id(model), *key)
  found = _CHECKED.get(full_key)
  if found is not None:
    ref, live, copies, result = found
    try:
      if ref() is model and live == copies:
        return result
    except Exception:  # pylint: disable=broad-except  # e.g. an array attribute replaced: == is elementwise
      pass
  result = compute()
  snapshot = _snapshot(model)
  if snapshot is not None:
    if len(_CHECKED) >= _CHECKED_SIZE:
      _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[full_key] = (weakref.ref(model), *snapshot, result)
  return result


def _check_data(model: nnx.Module, loss_fn: LossFn, train_loader: Any, val_loader: Any, eval_step: Any) -> list[str]:
  """Checks, before any training, that the batches fit the model and loss_fn; returns aux names.

  The first training batch and every distinct shape of validation batch are
  traced (shapes only); with the default loss, labels are checked on the host
  against the number of outputs; a padded validation batch is evaluated twice
  to check that loss_fn honours its mask.
  """
  first = next(iter(train_loader.epoch(0)))
  if not isinstance(first, Mapping):
    _trace_loss(model, loss_fn, first, 'train_loader')  # raises, naming the loader
  names = _memoized(model, ('trace', loss_fn, 'train_loader', _signature(first)),
                    lambda: _trace_loss(model, loss_fn, first, 'train_loader'))
  classify = loss_fn is classification_loss
  num_classes = _memoized(model, ('classes', _signature(first)), lambda: _num_classes(model, first)) \
      if classify else None
  data = getattr(train_loader, 'data', None)
  if classify and isinstance(data, Mapping) and 'label' in data:
    _check_labels(data['label'], None, num_classes, 'train_loader')
  if val_loader is None:
    return names
  _check_val_loader_covers_its_data(val_loader)
  seen, padded = set(), None
  for batch in _val_batches(val_loader):
    signature = _signature(batch) if isinstance(batch, Mapping) else None
    if signature not in seen:
      seen.add(signature)
      val_names = _memoized(model, ('trace', loss_fn, 'val_loader', signature),
                            lambda: _trace_loss(model, loss_fn, batch, 'val_loader'))
      if val_names != names:
        raise ValueError(f'val_loader: loss_fn returns aux {val_names} on its batches but {names} on training batches')
    if classify and 'label' in batch:
      _check_labels(batch['label'], batch.get('mask'), num_classes, 'val_loader')
    if padded is None and 'mask' in batch and np.any(np.asarray(batch['mask']) == 0):
      padded = batch
  if padded is not None:
    _memoized(model, ('mask', loss_fn, _signature(padded)),
              lambda: _check_loss_respects_mask(model, eval_step, padded))
  return names


def _check_parallel_loaders(parallel: DataParallel | None, train_loader: Any, val_loader: Any) -> None:
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


def _check_best_metric(names: list[str], best_metric: str, has_val: bool) -> None:
  """Checks that ``best_metric`` will be recorded, given the aux names loss_fn returns."""
  names = ['loss', *names]
  available = [f'train_{n}' for n in (*names, 'grad_norm')] + ([f'val_{n}' for n in names] if has_val else [])
  if best_metric not in available:
    raise ValueError(
        f'best_metric: expected one of the epoch metrics {available}, got {best_metric!r}'
        + ('' if has_val else ' (pass a val_loader for val_ metrics, or best_metric=None)')
    )


def _initial_hyperparams(optimizer: nnx.Optimizer, model: nnx.Module) -> dict[str, float]:
  """The hyperparameters (``optax.inject_hyperparams``) a fresh optimizer of this tx starts with."""
  fresh = nnx.Optimizer(model, optimizer.tx, wrt=optimizer.wrt)
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(fresh)))[0]
  found = {}
  for path, value in flat:
    key = '/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)
    if '/hyperparams/' in f'/{key}' and np.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.number):
      found[key] = float(value)
  return found


def _set_hyperparams(optimizer: nnx.Optimizer, values: Mapping[str, float]) -> None:
  """Sets the ``optax.inject_hyperparams`` values of ``optimizer``'s state, in place."""
  state = nnx.state(optimizer)
  pure = nnx.to_pure_dict(state)
  for key, value in values.items():
    *parents, leaf = key.split('/')
    node = pure
    for part in parents:
      node = node[int(part)] if isinstance(node, (list, tuple)) or part not in node else node[part]
    node[leaf] = jnp.asarray(value, jnp.asarray(node[leaf]).dtype)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(optimizer, state)


def _contents(directory: Any) -> list[str]:
  """What a checkpoint directory holds besides the lock, empty folders and temporary writes."""
  found = set()
  for path in directory.rglob('*'):
    name = path.relative_to(directory).as_posix()
    if path.is_dir() or name == '.lock' or '.orbax-checkpoint-tmp' in name or '.write-test-' in name:
      continue
    found.add('/'.join(name.split('/')[:2]))  # e.g. 'best/12' or 'history/<file>'
  return sorted(found)


def _overflow_skipped(row: Mapping[str, float], train_step: Any) -> bool:
  """A step that loss scaling skipped on purpose: gradients overflowed at a scale that can still shrink.

  Such steps change nothing but the scale, so they are expected, not errors.
  A non-finite loss, or an overflow at the smallest scale, is a real failure.
  """
  if row.get('grads_finite', 1.0) != 0.0:
    return False
  return math.isfinite(row['loss']) and row['loss_scale'] > train_step.loss_scale.min_scale


def _finite_mean(values: list[float]) -> float:
  kept = [v for v in values if math.isfinite(v)]
  return float(np.mean(kept)) if kept else math.nan


def _nonfinite(row: Mapping[str, float]) -> str | None:
  """Which of a step's loss and gradient norm is NaN or infinite first, if any.

  The gradient norm matters on its own: a loss can come out finite while the
  gradients are not (a compiled forward pass need not propagate a NaN through
  every fused operation, and ``jnp.nan_to_num`` on the loss hides it).
  """
  for name in ('loss', 'grad_norm'):
    if name in row and not math.isfinite(row[name]):
      return name
  return None


class _Run:
  """The mutable state of one fit() call, and the chores done on it.

  Keeping it in one object keeps fit() itself a readable loop.
  """

  def __init__(
      self, model: nnx.Module, optimizer: nnx.Optimizer, train_loader: Any, *,
      checkpoints: Checkpoints | None, best_metric: str | None, best_mode: str,
      skip_nonfinite: bool, progress: bool,
  ):
    self.model, self.optimizer = model, optimizer
    self.steps_per_epoch = len(train_loader)
    self.fingerprint = _fingerprint(train_loader)
    self.checkpoints = checkpoints
    self.best_metric, self.best_mode = best_metric, best_mode
    self.skip_nonfinite = skip_nonfinite
    self.progress = progress
    self.history = History()
    self.epoch, self.batch, self.step = 0, 0, 0  # next epoch and batch; steps done
    self.best: dict[str, Any] | None = None
    self.nonfinite_steps = 0
    self.first_nonfinite: int | None = None
    self.pending: list[tuple[int, Any, int]] = []  # (first step, Packed metrics, stacked steps or 0)
    self.train_step: Any = None  # set by fit(); holds the loss-scale state
    self.params: list[nnx.Variable] | None = None  # the model's Param Variables, collected once
    self.overflow_steps = 0  # steps skipped by loss scaling (expected, not errors)
    self.epoch_rows: list[dict[str, float]] = []
    self.bar = None
    self.postfix: dict[str, Any] = {}
    self.live: LivePlot | None = None  # redrawn where metrics reach the host, never per step
    self.log_file: HistoryLog | None = None  # the history on disk, appended at each checkpoint
    self.hyperparams: dict[str, float] = {}  # what the optimizer's run started with

  # Resuming ----------------------------------------------------------------

  def open_checkpoints(self, *, resume: bool, epochs: int, accept_new_hyperparams: bool) -> None:
    """Takes the directory's writer lock, then resumes the run in it or checks that it is empty.

    Nothing is ever started afresh over existing checkpoints: a directory
    that holds anything but no usable latest checkpoint is an error.
    """
    checkpoints = self.checkpoints
    checkpoints.acquire()  # one writer per directory, and a writability check, before any training
    self.hyperparams = _initial_hyperparams(self.optimizer, self.model)
    if checkpoints.step('latest') is not None:
      if not resume:
        raise ValueError(
            f'checkpoint_dir: {checkpoints.directory} already holds a checkpoint (step '
            f'{checkpoints.step("latest")}) and resume=False; pass resume=True to continue it, '
            'or a new directory to start afresh'
        )
      self.resume(epochs, accept_new_hyperparams)
      return
    found = _contents(checkpoints.directory)
    if found:
      raise ValueError(
          f'checkpoint_dir: {checkpoints.directory} holds {found[:5]} but no latest checkpoint to resume '
          'from, so a new run there could overwrite them. To start afresh, pass a new checkpoint_dir '
          "(or move those away yourself); to go on from the best checkpoint, load it with "
          "ft.restore_checkpoint(checkpoint_dir, model, optimizer, which='best') and fit into a new checkpoint_dir"
      )
    self.log_file = HistoryLog(checkpoints.directory / 'history')

  def resume(self, epochs: int, accept_new_hyperparams: bool = False) -> None:
    """Restores the newest latest checkpoint that verifies, and the loop's position.

    Newer checkpoints that fail to verify are moved to ``set_aside/`` (with a
    warning saying why), never deleted. The metadata is cross-checked: the
    data position against the step, the history against its checksums, the
    optimizer's hyperparameters against the ones given.
    """
    checkpoints = self.checkpoints
    info = checkpoints.restore(self.model, self.optimizer, which='latest')
    for step, reason in info.skipped:
      moved = checkpoints.set_aside('latest', step, reason)
      warnings.warn(
          f'checkpoint_dir: skipped the checkpoint of step {step}: {reason}. It was moved to {moved}; '
          f'resuming from step {info.step} instead', RuntimeWarning, stacklevel=4,
      )
    meta = info.metadata
    if meta.get('format') != _FORMAT:
      raise ValueError(
          f'checkpoint_dir: the checkpoint at {info.path} was not written by this version of '
          f'flaxtrain.fit (metadata format {meta.get("format")!r}, expected {_FORMAT})'
      )
    if meta['loader'] != self.fingerprint:
      raise ValueError(
          f'train_loader: differs from the one the checkpoint at {info.path} was trained with '
          f'({self.fingerprint} now, {meta["loader"]} then), so the resumed run would not see '
          'the batches it would have seen; resume with the same loader, or use a new checkpoint_dir'
      )
    epoch, batch = meta['epoch'], meta['batch']
    if not (isinstance(epoch, int) and isinstance(batch, int) and 0 <= batch < self.steps_per_epoch
            and epoch * self.steps_per_epoch + batch == info.step):
      raise ValueError(
          f'checkpoint_dir: the checkpoint at {info.path} was saved at step {info.step}, but its '
          f'metadata puts it at epoch {epoch!r}, batch {batch!r} ({self.steps_per_epoch} steps per epoch); '
          'the two disagree, so its position cannot be trusted'
      )
    try:
      history = HistoryLog.read(checkpoints.directory / 'history', meta['history'])
    except ValueError as error:
      raise ValueError(f'checkpoint_dir: the history of the checkpoint at {info.path} is unusable: {error}') from error
    if len(history) != info.step:
      raise ValueError(
          f'checkpoint_dir: the checkpoint at {info.path} was saved at step {info.step} but its history '
          f'holds {len(history)} steps'
      )
    self.check_hyperparams(meta.get('hyperparams', {}), info.path, accept_new_hyperparams)
    best = meta.get('best')
    if best and (best['metric'], best['mode']) != (self.best_metric, self.best_mode) \
        and self.best_metric is not None and checkpoints.step('best') is not None:
      raise ValueError(
          f"best_metric: the best checkpoint in {checkpoints.directory} was chosen by {best['metric']!r} "
          f"({best['mode']}), and this run would replace it by {self.best_metric!r} ({self.best_mode}); "
          f"pass best_metric={best['metric']!r}, best_mode={best['mode']!r} (or best_metric=None), "
          'or use a new checkpoint_dir'
      )
    if best and (best['metric'], best['mode']) == (self.best_metric, self.best_mode):
      self.best = best
      if best['step'] == info.step and checkpoints.step('best') != info.step:
        # The run stopped between writing the latest and the best copy of this step.
        checkpoints._write(info.step, self.model, self.optimizer, meta, kinds=('best',))  # pylint: disable=protected-access
    checkpoints.adopt()  # the resumed run's checkpoints are its own: keep= may rotate them
    self.epoch, self.batch, self.step = epoch, batch, info.step
    self.history = history
    self.log_file = HistoryLog(checkpoints.directory / 'history', meta['history'], history)
    self.nonfinite_steps = meta['nonfinite_steps']
    self.first_nonfinite = meta['first_nonfinite']
    self.overflow_steps = meta.get('overflow_steps', 0)
    self.restore_loss_scale(meta.get('loss_scale'), info.path)
    first = self.epoch * self.steps_per_epoch  # rows of this epoch before the checkpoint
    self.epoch_rows = [
        {k: v for k, v in row.items() if k != 'step'}
        for row in self.history.state_dict()['steps'] if row['step'] >= first and not _nonfinite(row)
    ]
    if epochs < self.epoch or (epochs == self.epoch and self.batch > 0):
      done = f'{self.epoch} epochs' + (f' and {self.batch} batches' if self.batch else '')
      raise ValueError(
          f'epochs: the run in {checkpoints.directory} has already done {done} ({self.step} steps), '
          f'more than epochs={epochs}; epochs counts every epoch, those already done included, so '
          f'pass epochs > {self.epoch} to train on, or a new checkpoint_dir to start afresh'
      )
    if epochs == self.epoch:
      self.say(f'The run in {checkpoints.directory} has already done its {epochs} epochs ({self.step} steps): '
               'nothing to train. Pass a larger epochs to train on.')
      return
    self.say(
        f'Resumed from {info.path}: {self.step} steps done, continuing with epoch '
        f'{self.epoch + 1}, batch {self.batch + 1} of {self.steps_per_epoch}'
    )

  def loss_scale_state(self) -> dict[str, float] | None:
    """The train step's loss-scale state as plain numbers for the metadata, or None."""
    loss_scale = self.train_step.loss_scale if self.train_step is not None else None
    if loss_scale is None:
      return None
    return {'scale': float(loss_scale.scale), 'good_steps': int(loss_scale.good_steps)}

  def restore_loss_scale(self, stored: Mapping[str, float] | None, path: Any) -> None:
    """Puts the checkpoint's loss-scale state back into the train step, so resuming stays exact."""
    loss_scale = self.train_step.loss_scale if self.train_step is not None else None
    if loss_scale is None or stored is None:
      if loss_scale is not None and self.step > 0:
        warnings.warn(f'loss_scale: the checkpoint at {path} holds no loss-scale state (it was trained '
                      'without loss scaling); starting from the loss_scale given', RuntimeWarning, stacklevel=4)
      return
    self.train_step.loss_scale = loss_scale.replace(
        scale=jnp.asarray(stored['scale'], jnp.float32), good_steps=jnp.asarray(stored['good_steps'], jnp.int32))

  def check_hyperparams(self, stored: Mapping[str, float], path: Any, accept: bool) -> None:
    """The optimizer given must start from the hyperparameters the checkpoint's run started from.

    Restoring overwrites the optimizer state, in which ``inject_hyperparams``
    keeps constant hyperparameters: without this check a new constant
    learning rate would be silently replaced by the checkpoint's.
    """
    given = self.hyperparams
    changed = {k: (given[k], stored[k]) for k in sorted(given.keys() & stored.keys()) if given[k] != stored[k]}
    if not changed:
      return
    if not accept:
      listed = '; '.join(f'{key.rsplit("/", 1)[-1]} ({key}): {new:.6g} in the optimizer given, {old:.6g} in '
                         'the checkpoint' for key, (new, old) in changed.items())
      raise ValueError(
          f'optimizer: its hyperparameters differ from those of the run saved at {path}: {listed}. '
          'Resuming would silently keep the checkpoint\'s values; pass accept_new_hyperparams=True '
          'to train on with the new ones, or build the optimizer as before'
      )
    _set_hyperparams(self.optimizer, {k: new for k, (new, _) in changed.items()})
    self.say('Resuming with the new hyperparameters: ' + ', '.join(
        f'{k.rsplit("/", 1)[-1]} {old:.6g} -> {new:.6g}' for k, (new, old) in changed.items()))

  # Logging -----------------------------------------------------------------

  def say(self, message: str) -> None:
    if self.progress:
      tqdm.write(message)

  def record(self, metrics: Any) -> None:
    """Keeps a step's metrics on the device until the next log().

    As in optax and :class:`flaxtrain.History`, steps count from 0: the
    metrics of the first update are recorded at step 0, and ``self.step`` is
    the number of updates done.
    """
    self.pending.append((self.step, metrics, 0))
    self.step += 1

  def record_many(self, metrics: Any, steps: int) -> None:
    """Keeps the stacked metrics of ``steps`` updates (``train_step.many``) until the next log()."""
    self.pending.append((self.step, metrics, steps))
    self.step += steps

  def log(self, *, check: bool = True) -> None:
    """Brings pending metrics to the host in one transfer, then checks and shows them."""
    if not self.pending:
      return
    if self.params is None:
      # The same Variables, whose arrays the step replaces, until the graph changes: walk it once.
      self.params = _memoized(self.model, ('params',), lambda: jax.tree.leaves(
          nnx.state(self.model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)))
    pending, self.pending = self.pending, []
    fetched, finite_values, finite_params = _fetch(
        [m.values for _, m, _ in pending], [variable.get_raw_value() for variable in self.params])
    steps, rows = [], []
    for (first, packed, stacked), values in zip(pending, fetched):
      names = packed.names
      if stacked:
        steps.extend(range(first, first + stacked))
        rows.extend(dict(zip(names, row)) for row in values.tolist())
      else:
        steps.append(first)
        rows.append(dict(zip(names, values.tolist())))
    if self.bar is not None:
      self.bar.update(len(steps))  # here, not per step: the step loop stays free of Python work
    if finite_values:  # the common case: no per-row checks
      bad = []
      self.epoch_rows.extend(rows)
    else:
      overflow = [_overflow_skipped(row, self.train_step) for row in rows]
      self.overflow_steps += sum(overflow)
      bad = [(step, row) for step, row, expected in zip(steps, rows, overflow) if _nonfinite(row) and not expected]
      self.epoch_rows.extend(row for row in rows if not _nonfinite(row))  # epoch means count the steps that trained
    self.history._extend_host_rows(steps, rows)  # pylint: disable=protected-access  # Python floats already
    if bad:
      self.nonfinite_steps += len(bad)
      if self.first_nonfinite is None:
        self.first_nonfinite = bad[0][0]
    self.postfix['loss'] = f'{_finite_mean([r["loss"] for r in rows]):.4f}'  # running: this interval's mean
    if self.nonfinite_steps:
      self.postfix['skipped'] = self.nonfinite_steps
    if self.overflow_steps:
      self.postfix['overflow'] = self.overflow_steps
    if self.bar is not None:
      self.bar.set_postfix(self.postfix, refresh=False)
    if self.live is not None:
      self.live.update(self.history)
    if not check:
      return
    if bad and not self.skip_nonfinite:
      step, row = bad[0]
      if _nonfinite(row) == 'loss':
        what = f'the loss was {row["loss"]} at step {step} ({self.where(step)})'
      else:
        what = (f'the gradients were not finite at step {step} ({self.where(step)}): their norm was '
                f'{row["grad_norm"]}, although the loss was {row["loss"]}')
      raise self.nonfinite_error(step, what)
    if not finite_params:
      if self.skip_nonfinite and self.first_nonfinite is not None:
        raise self.nonfinite_error(self.first_nonfinite, (
            'the parameters became non-finite: optax.apply_if_finite skips at most '
            'max_consecutive_errors bad steps in a row, then applies the update anyway. '
            f'The first step with a non-finite loss or gradient was step {self.first_nonfinite} '
            f'({self.where(self.first_nonfinite)})'))
      raise self.nonfinite_error(steps[0], (
          f'the parameters became non-finite between step {steps[0]} ({self.where(steps[0])}) '
          f'and step {steps[-1]}, although every loss and gradient norm was finite'))

  def where(self, step: int) -> str:
    epoch, batch = divmod(step, self.steps_per_epoch)
    return f'epoch {epoch + 1}, batch {batch + 1}'

  def nonfinite_error(self, step: int, what: str) -> FloatingPointError:
    path = self.checkpoints.path('latest') if self.checkpoints else None
    where = (f'The last good checkpoint is {path} (nothing after it was saved).' if path else
             'No checkpoint was written' + ('.' if self.checkpoints else ' (checkpoint_dir=None).'))
    error = FloatingPointError(
        f"{what}. {where} Check that step's batch and the learning rate; to skip such steps "
        "instead, wrap the optimizer in optax.apply_if_finite and pass on_nonfinite='skip'."
    )
    error.step, error.checkpoint, error.history = step, path, self.history
    return error

  # Epochs and checkpoints ----------------------------------------------------

  def end_epoch(self, epoch: int, eval_step: Any, val_loader: Any) -> None:
    """Records the epoch's metrics, validates, and writes the checkpoints."""
    self.log()
    names = {k for row in self.epoch_rows for k in row} - {'learning_rate', 'loss_scale', 'grads_finite'}
    metrics = {f'train_{k}': _finite_mean([row[k] for row in self.epoch_rows if k in row]) for k in sorted(names)}
    self.epoch_rows.clear()
    if val_loader is not None:
      batches = val_loader.epoch(0) if hasattr(val_loader, 'epoch') else val_loader
      results = evaluate(eval_step, self.model, batches)
      metrics.update({f'val_{k}': v for k, v in results.items() if k != 'count'})
    self.history.record_epoch(epoch, metrics, step=self.step)
    self.postfix.update({k.replace('accuracy', 'acc'): f'{v:.4f}' for k, v in metrics.items()
                         if k in ('val_loss', 'val_accuracy')})
    if self.bar is not None:
      self.bar.set_postfix(self.postfix, refresh=False)
      self.bar.update(0)  # redraws with the epoch's metrics, unless it was drawn under 0.1 s ago
    if self.live is not None:
      self.live.update(self.history, force=True)
    self.save(epoch + 1, 0, metrics)

  def improved(self, metrics: Mapping[str, float]) -> bool:
    value = metrics.get(self.best_metric, math.nan)
    if self.best_metric is None or not math.isfinite(value):
      return False
    if self.best is not None:
      old = self.best['value']
      if (value <= old) if self.best_mode == 'max' else (value >= old):
        return False
    self.best = {'metric': self.best_metric, 'mode': self.best_mode, 'value': value, 'step': self.step}
    return True

  def save(self, epoch: int, batch: int, metrics: Mapping[str, float] | None = None) -> None:
    """Writes the latest checkpoint (and the best, if ``metrics`` improved), at (epoch, batch)."""
    self.epoch, self.batch = epoch, batch
    if self.checkpoints is None:
      return
    best = metrics is not None and self.improved(metrics)
    try:
      metadata = {
          'format': _FORMAT, 'epoch': epoch, 'batch': batch, 'loader': self.fingerprint,
          'best': self.best, 'nonfinite_steps': self.nonfinite_steps,
          'first_nonfinite': self.first_nonfinite, 'hyperparams': self.hyperparams,
          'overflow_steps': self.overflow_steps, 'loss_scale': self.loss_scale_state(),
          'history': self.log_file.write(self.history),  # appends only the new rows
      }
      self.checkpoints.save(self.step, self.model, self.optimizer, metadata=metadata, best=best)
    except Exception as error:  # a full disk, a vanished directory, ...: keep the history
      failure = CheckpointError(
          f'checkpoint_dir: saving the checkpoint of step {self.step} to {self.checkpoints.directory} '
          f'failed ({type(error).__name__}: {str(error).strip()[:300]}). The history so far is in '
          'this error\'s .history; the previous checkpoints are untouched'
      )
      failure.history = self.history
      raise failure from error


def _stack_size(index: int, step: int, steps_per_epoch: int, per_dispatch: int, checkpoint_every: int | None) -> int:
  """How many steps the next dispatch runs: ``per_dispatch``, or 1 where a full stack does not fit.

  A stack starts at a multiple of ``per_dispatch`` within the epoch and ends
  before the epoch's end and before the next checkpoint position, so the
  stacks depend only on the position: a resumed run stacks as the
  uninterrupted one did.
  """
  if per_dispatch == 1 or index % per_dispatch or index + per_dispatch > steps_per_epoch:
    return 1
  if checkpoint_every and checkpoint_every - step % checkpoint_every < per_dispatch:
    return 1
  return per_dispatch


def _same_shapes(batches: list[Mapping[str, Any]]) -> bool:
  """Whether ``batches`` stack: the same keys, shapes and dtypes as the first."""
  spec = lambda batch: {k: (np.shape(v), getattr(v, 'dtype', None)) for k, v in batch.items()}
  first = spec(batches[0])
  return all(spec(batch) == first for batch in batches[1:])


@jax.jit
def _gather(groups: list[list[jax.Array]], params: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
  """Each group of same-shaped metric arrays stacked into one, and whether ``params`` are all finite."""
  return [jnp.stack(group) for group in groups], precision.all_finite(params)


def _fetch(values: list[jax.Array], params: list[jax.Array]) -> tuple[list[np.ndarray], bool, bool]:
  """``values`` on the host, whether they are all finite, and whether ``params`` are.

  One dispatch and one transfer, whatever the number of pending steps:
  bringing each step's metrics over on its own costs a few microseconds of
  Python apiece, as much as a tiny model's step. They are stacked on the
  device instead, in groups of one shape, each padded (with copies of its
  last array) to a power-of-two length, so that the gather compiles once per
  length bucket rather than once per number of pending steps.
  """
  by_shape: dict[tuple[int, ...], list[int]] = {}
  for i, value in enumerate(values):
    by_shape.setdefault(value.shape, []).append(i)
  groups = []
  for indices in by_shape.values():
    group = [values[i] for i in indices]
    groups.append(group + group[-1:] * ((1 << (len(group) - 1).bit_length()) - len(group)))
  stacked, finite_params = jax.device_get(_gather(groups, params))
  fetched: list[Any] = [None] * len(values)
  finite_values = True
  for indices, host in zip(by_shape.values(), stacked):
    finite_values = finite_values and bool(np.isfinite(host).all())  # the padding repeats real rows
    for row, i in enumerate(indices):
      fetched[i] = host[row]
  return fetched, finite_values, bool(finite_params)


def fit(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    train_loader: Any,
    *,
    epochs: int,
    val_loader: Iterable[Mapping[str, Any]] | None = None,
    loss_fn: LossFn = classification_loss,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    best_metric: str | None = 'val_accuracy',
    best_mode: Literal['max', 'min'] = 'max',
    log_every: int = 50,
    progress: bool = True,
    live_plot: bool | Sequence[str] | LivePlot = False,
    on_nonfinite: Literal['raise', 'skip'] | None = None,
    resume: bool = True,
    keep: int = 3,
    accept_new_hyperparams: bool = False,
    steps_per_dispatch: int = 1,
    loss_scale: precision.DynamicLossScale | None = None,
    parallel: DataParallel | bool | None = None,
) -> History:
  """Trains ``model`` in place for ``epochs`` epochs and returns the History.

  Each epoch runs every batch of ``train_loader.epoch(epoch)`` through the
  jitted train step, then evaluates on ``val_loader`` in evaluation mode
  (Dropout off, BatchNorm on running averages), records the epoch's metrics
  (``train_<name>``: the mean over the epoch's steps; ``val_<name>``) and,
  with a ``checkpoint_dir``, writes the latest checkpoint and, when
  ``best_metric`` improved, the best one.

  With ``resume=True`` and a checkpoint in ``checkpoint_dir``, the model and
  optimizer are first restored from the latest checkpoint and training goes
  on from the batch after it, up to ``epochs`` epochs in total: calling
  ``fit(..., epochs=2 * n)`` after ``fit(..., epochs=n)`` gives what one call
  with ``epochs=2 * n`` gives.

  Args:
    model: an ``nnx.Module``; updated in place.
    optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``; updated in place.
    train_loader: a :class:`flaxtrain.DataLoader` (anything with ``len()``
      and ``.epoch(epoch, start)`` whose order depends only on the epoch).
    epochs: the total number of epochs, counting those already done by the
      run being resumed.
    val_loader: batches to validate on after each epoch (a ``DataLoader``
      with ``remainder='pad'``, or a list of batches), or None.
    loss_fn: ``loss_fn(model, batch) -> (loss, aux)``.
    checkpoint_dir: where to write checkpoints (see
      :class:`flaxtrain.Checkpoints`); None writes none.
    checkpoint_every: also write the latest checkpoint every this many steps
      within an epoch; by default only at the end of each epoch.
    best_metric: the epoch metric that picks the best checkpoint, e.g.
      ``'val_accuracy'`` or ``'val_loss'``; None keeps only the latest.
    best_mode: ``'max'`` or ``'min'``: whether larger ``best_metric`` is better.
    log_every: bring step metrics to the host, check them and update the
      progress bar every this many steps.
    progress: show a ``tqdm`` progress bar with the epoch, step and running
      loss; in a notebook it is plain text redrawn in place, so the stored
      notebook shows the run's final state.
    live_plot: redraw training curves in place while training (see
      :class:`flaxtrain.LivePlot`): True plots loss and accuracy, a sequence
      names the metrics, or pass a LivePlot. Redrawn at most once a second at
      log steps and at every epoch end; no extra device work.
    on_nonfinite: what a NaN or infinite loss does. ``'raise'`` stops with a
      FloatingPointError; ``'skip'`` records it and goes on (the optimizer
      must be wrapped in ``optax.apply_if_finite``, which leaves the
      parameters unchanged on such steps). None picks ``'skip'`` if the
      optimizer is so wrapped and ``'raise'`` otherwise. Either way,
      parameters that become non-finite stop the run.
    resume: continue from the latest checkpoint in ``checkpoint_dir``, if any
      (the newest one that verifies; newer ones that fail their checksums are
      moved to ``set_aside/`` with a warning). With False, a
      ``checkpoint_dir`` that already holds a checkpoint is an error. Either
      way, a directory holding anything but no usable latest checkpoint is an
      error: nothing is started afresh over it, deleted or overwritten.
    keep: how many latest checkpoints to keep (older ones of this run are
      deleted); more let a run fall back past a corrupt one.
    accept_new_hyperparams: when resuming, train on with the hyperparameters
      of the optimizer given (e.g. a new constant learning rate) where they
      differ from the checkpoint's; by default that is an error naming both.
    steps_per_dispatch: run this many steps per call to the device, through
      ``train_step.many`` on batches stacked with
      :func:`flaxtrain.stack_batches` (see :func:`flaxtrain.make_train_step`
      for when that scans and when it loops). The results are those of
      single steps; a stack never crosses an epoch's end or a
      ``checkpoint_every`` position, and the steps left over run one by one
      (no recompilation for a ragged stack), so checkpoints, resuming and the
      history stay per batch. 1 (the default) dispatches every step. Where
      ``many`` would loop (convolutions on the CPU backend), fit runs
      single steps: the same dispatches, without stacking.
    loss_scale: train with dynamic loss scaling (for float16; see
      :func:`flaxtrain.dynamic_loss_scale`). Steps whose gradients overflow
      are skipped by the step itself: they are recorded (``grads_finite``
      0) and counted, not treated as errors, unless the loss itself is not
      finite or the scale is already at its minimum. The scale's state is
      saved in each checkpoint and restored on resume.
    parallel: train data-parallel on the devices of a
      :class:`flaxtrain.DataParallel` (True: ``DataParallel()``, all
      devices): the model and optimizer are placed on its mesh, every
      training and validation batch is split over its devices (the loaders'
      batch sizes must be multiples of the device count: checked before
      training) and the results are those of one device up to float
      rounding. Checkpoints restore onto the current placement. None (the
      default): one device.

  Returns:
    The :class:`flaxtrain.History` (step and epoch metrics), including what
    the resumed run recorded before. Steps count from 0, as optax counts
    updates: the metrics of update ``i`` are recorded at step ``i``, and an
    epoch is recorded at the number of steps done. After a KeyboardInterrupt, the history
    so far; the last complete checkpoint is untouched.

  Raises:
    FloatingPointError: on a non-finite loss or parameters; the message
      names the step and the last good checkpoint, and the error carries
      ``step``, ``checkpoint`` and ``history`` attributes.
    ValueError: a checkpoint that does not match ``model``, ``optimizer``
      (its hyperparameters included) or ``train_loader``, or that cannot be
      read and verified; batches that do not fit ``model`` and ``loss_fn``,
      labels outside ``[0, num_classes)``, a ``val_loader`` that would skip
      examples or a ``loss_fn`` that ignores a padded batch's ``mask``; all
      before any training.
    CheckpointError: ``checkpoint_dir`` is in use by another run or cannot
      be written (before any training), or a save failed (the error's
      ``history`` holds the history so far).

  Example:
    >>> history = ft.fit(model, optimizer, ft.DataLoader(splits.train, 64),   # doctest: +SKIP
    ...                  epochs=10, val_loader=ft.DataLoader(splits.val, 128, shuffle=False,
    ...                  remainder='pad'), checkpoint_dir='runs/cnn')
    >>> ft.plot_history(history, 'accuracy')                                  # doctest: +SKIP
  """
  _check_arguments(model, optimizer, train_loader, epochs, val_loader, loss_fn, checkpoint_dir,
                   checkpoint_every, best_metric, best_mode, log_every, on_nonfinite)
  _check_checkpoint_arguments(checkpoint_dir, keep, resume, accept_new_hyperparams)
  _checks.check_int('steps_per_dispatch', steps_per_dispatch)
  # Checks loss_fn and loss_scale (no device work). Its metrics come back packed in
  # one vector per step, which log() stacks on the device and transfers once per log.
  parallel = as_parallel(parallel)
  _check_parallel_loaders(parallel, train_loader, val_loader)
  train_step = _make_packed_train_step(loss_fn, loss_scale, parallel)
  eval_step = _eval_step(loss_fn)  # the mask check compiles it for the validation it runs
  if parallel is not None:
    eval_step = _split_batches(eval_step, parallel)
  aux_names = _check_data(model, loss_fn, train_loader, val_loader, eval_step)
  if checkpoint_dir is not None and best_metric is not None:
    _check_best_metric(aux_names, best_metric, val_loader is not None)
  skip = on_nonfinite == 'skip' or (on_nonfinite is None and _skips_nonfinite(optimizer.opt_state))
  if parallel is not None:
    parallel.place(model, optimizer)  # before a resume, which restores onto these placements
  checkpoints = Checkpoints(checkpoint_dir, keep=keep) if checkpoint_dir is not None else None
  run = _Run(model, optimizer, train_loader, checkpoints=checkpoints, best_metric=best_metric,
             best_mode=best_mode, skip_nonfinite=skip, progress=progress)
  run.live = as_live_plot(live_plot)
  run.train_step = train_step
  try:
    if checkpoints is not None:
      run.open_checkpoints(resume=resume, epochs=epochs, accept_new_hyperparams=accept_new_hyperparams)
    if steps_per_dispatch > 1 and train_step.many_mode(
        model, optimizer, stack_batches([next(iter(train_loader.epoch(0)))])) == 'loop':
      steps_per_dispatch = 1  # 'loop' dispatches every step anyway: skip the stacking
    steps_per_epoch = len(train_loader)
    run.bar = progress_bar(epochs * steps_per_epoch, initial=min(run.step, epochs * steps_per_epoch),
                           unit='step', disable=not progress)
    for epoch in range(run.epoch, epochs):
      run.bar.set_description(f'epoch {epoch + 1}/{epochs}', refresh=False)  # drawn at the next update
      index = run.batch if epoch == run.epoch else 0  # the next batch of this epoch
      batches = train_loader.epoch(epoch, index)
      while index < steps_per_epoch:
        stacked = _stack_size(index, run.step, steps_per_epoch, steps_per_dispatch, checkpoint_every)
        if stacked > 1:
          chunk = [next(batches) for _ in range(stacked)]
          if _same_shapes(chunk):
            run.record_many(train_step.many(model, optimizer, stack_batches(chunk)), stacked)
          else:  # a ragged batch from a custom loader: one step each, nothing recompiled
            for batch in chunk:
              run.record(train_step(model, optimizer, batch))
        elif steps_per_dispatch == 1:  # single steps up to the next log, checkpoint or the epoch's end
          stacked = min(steps_per_epoch - index, log_every - run.step % log_every,
                        checkpoint_every - run.step % checkpoint_every if checkpoint_every else steps_per_epoch)
          pending = run.pending
          for _ in range(stacked):  # run.record() inlined: a tiny model's step is only tens of microseconds
            pending.append((run.step, train_step(model, optimizer, next(batches)), 0))
            run.step += 1
        else:
          run.record(train_step(model, optimizer, next(batches)))
        index += stacked
        if run.step % log_every < stacked:  # passed a multiple of log_every
          run.log()
        if checkpoint_every and run.step % checkpoint_every == 0 and index < steps_per_epoch:
          run.log()
          run.save(epoch, index)
      run.end_epoch(epoch, eval_step, val_loader)
  except KeyboardInterrupt:
    run.log(check=False)
    path = checkpoints.path('latest') if checkpoints else None
    tqdm.write(
        f'Interrupted after {run.step} steps. Returning the history so far. '
        + (f'The last complete checkpoint is {path}; call fit again with the same '
           'checkpoint_dir to resume from it.' if path else 'No checkpoint was written.')
    )
  finally:
    if run.bar is not None:
      run.bar.close()
    if run.log_file is not None:
      run.log_file.close()
    if checkpoints is not None:
      checkpoints.close()  # releases the writer lock
  return run.history
