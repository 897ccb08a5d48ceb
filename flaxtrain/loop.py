"""fit(): the whole training loop, built from flaxtrain's public pieces.

``fit`` is the loop of the notebooks with the chores done carefully, not a
framework: it trains with :func:`flaxtrain.make_train_step`, validates with
:func:`flaxtrain.make_eval_step` and :func:`flaxtrain.evaluate`, records a
:class:`flaxtrain.History` and writes :class:`flaxtrain.Checkpoints`. What it
adds is what breaks when done in a hurry:

* **Few syncs.** Step metrics stay on the device and come back in one
  transfer every ``log_every`` steps (and at the end of each epoch), where the
  progress bar is updated and the losses are checked for NaN and inf.
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
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from flaxtrain import _checks
from flaxtrain.checkpoint import Checkpoints
from flaxtrain.history import History
from flaxtrain.steps import LossFn
from flaxtrain.steps import classification_loss
from flaxtrain.steps import eval_view
from flaxtrain.steps import evaluate
from flaxtrain.steps import make_eval_step
from flaxtrain.steps import make_train_step

__all__ = ['fit']

_FORMAT = 1  # version of the metadata fit() stores in a checkpoint


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


def _check_best_metric(
    model: nnx.Module, loss_fn: LossFn, batch: Mapping[str, Any], best_metric: str, has_val: bool
) -> None:
  """Checks that ``best_metric`` will be recorded, by tracing loss_fn (no device work)."""
  _, aux = nnx.eval_shape(loss_fn, eval_view(model), batch)
  names = ['loss', *aux]
  available = [f'train_{n}' for n in (*names, 'grad_norm')] + ([f'val_{n}' for n in names] if has_val else [])
  if best_metric not in available:
    raise ValueError(
        f'best_metric: expected one of the epoch metrics {available}, got {best_metric!r}'
        + ('' if has_val else ' (pass a val_loader for val_ metrics, or best_metric=None)')
    )


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
    self.pending: list[tuple[int, Mapping[str, jax.Array]]] = []
    self.epoch_rows: list[dict[str, float]] = []
    self.bar = None
    self.postfix: dict[str, Any] = {}

  # Resuming ----------------------------------------------------------------

  def resume(self) -> None:
    """Restores the latest checkpoint into the model and optimizer, and the loop's position."""
    info = self.checkpoints.restore(self.model, self.optimizer, which='latest')
    meta = info.metadata
    if meta.get('format') != _FORMAT:
      raise ValueError(
          f'checkpoint_dir: the checkpoint at {info.path} was not written by flaxtrain.fit '
          f'(metadata format {meta.get("format")!r}, expected {_FORMAT})'
      )
    if meta['loader'] != self.fingerprint:
      raise ValueError(
          f'train_loader: differs from the one the checkpoint at {info.path} was trained with '
          f'({self.fingerprint} now, {meta["loader"]} then), so the resumed run would not see '
          'the batches it would have seen; resume with the same loader, or use a new checkpoint_dir'
      )
    self.epoch, self.batch, self.step = meta['epoch'], meta['batch'], info.step
    self.history = History.from_state_dict(meta['history'])
    best = meta.get('best')
    if best and (best['metric'], best['mode']) == (self.best_metric, self.best_mode):
      self.best = best
    self.nonfinite_steps = meta['nonfinite_steps']
    self.first_nonfinite = meta['first_nonfinite']
    first = self.epoch * self.steps_per_epoch  # rows of this epoch before the checkpoint
    self.epoch_rows = [
        {k: v for k, v in row.items() if k != 'step'}
        for row in self.history.state_dict()['steps'] if row['step'] >= first and not _nonfinite(row)
    ]
    self.say(
        f'Resumed from {info.path}: {self.step} steps done, continuing with epoch '
        f'{self.epoch + 1}, batch {self.batch + 1} of {self.steps_per_epoch}'
    )

  # Logging -----------------------------------------------------------------

  def say(self, message: str) -> None:
    if self.progress:
      tqdm.write(message)

  def record(self, metrics: Mapping[str, jax.Array]) -> None:
    """Keeps a step's metrics on the device until the next log().

    As in optax and :class:`flaxtrain.History`, steps count from 0: the
    metrics of the first update are recorded at step 0, and ``self.step`` is
    the number of updates done.
    """
    self.pending.append((self.step, metrics))
    self.step += 1
    if self.bar is not None:
      self.bar.update(1)

  def log(self, *, check: bool = True) -> None:
    """Brings pending metrics to the host in one transfer, then checks and shows them."""
    if not self.pending:
      return
    params = nnx.state(self.model, nnx.Param)
    rows, finite_params = jax.device_get(([m for _, m in self.pending], _all_finite(params)))
    steps = [step for step, _ in self.pending]
    self.pending.clear()
    rows = [{k: float(v) for k, v in row.items()} for row in rows]
    bad = [(step, row) for step, row in zip(steps, rows) if _nonfinite(row)]
    for step, row in zip(steps, rows):
      self.history.record_step(step, row)
      if not _nonfinite(row):  # epoch means count the steps that trained
        self.epoch_rows.append(row)
    if bad:
      self.nonfinite_steps += len(bad)
      if self.first_nonfinite is None:
        self.first_nonfinite = bad[0][0]
    self.postfix['loss'] = f'{_finite_mean([r["loss"] for r in rows]):.4f}'  # running: this interval's mean
    if self.nonfinite_steps:
      self.postfix['skipped'] = self.nonfinite_steps
    if self.bar is not None:
      self.bar.set_postfix(self.postfix, refresh=False)
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
    names = {k for row in self.epoch_rows for k in row} - {'learning_rate'}
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
      self.bar.set_postfix(self.postfix, refresh=True)
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
    metadata = {
        'format': _FORMAT, 'epoch': epoch, 'batch': batch, 'loader': self.fingerprint,
        'best': self.best, 'nonfinite_steps': self.nonfinite_steps,
        'first_nonfinite': self.first_nonfinite, 'history': self.history.state_dict(),
    }
    self.checkpoints.save(self.step, self.model, self.optimizer, metadata=metadata, best=best)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


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
    on_nonfinite: Literal['raise', 'skip'] | None = None,
    resume: bool = True,
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
    progress: show a ``tqdm`` progress bar with the epoch, step and running loss.
    on_nonfinite: what a NaN or infinite loss does. ``'raise'`` stops with a
      FloatingPointError; ``'skip'`` records it and goes on (the optimizer
      must be wrapped in ``optax.apply_if_finite``, which leaves the
      parameters unchanged on such steps). None picks ``'skip'`` if the
      optimizer is so wrapped and ``'raise'`` otherwise. Either way,
      parameters that become non-finite stop the run.
    resume: continue from the latest checkpoint in ``checkpoint_dir``, if any.
      With False, a ``checkpoint_dir`` that already holds a checkpoint is an
      error (nothing is overwritten).

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
    ValueError: a checkpoint that does not match ``model``, ``optimizer`` or
      ``train_loader``, or that cannot be read.

  Example:
    >>> history = ft.fit(model, optimizer, ft.DataLoader(splits.train, 64),   # doctest: +SKIP
    ...                  epochs=10, val_loader=ft.DataLoader(splits.val, 128, shuffle=False,
    ...                  remainder='pad'), checkpoint_dir='runs/cnn')
    >>> ft.plot_history(history, 'accuracy')                                  # doctest: +SKIP
  """
  _check_arguments(model, optimizer, train_loader, epochs, val_loader, loss_fn, checkpoint_dir,
                   checkpoint_every, best_metric, best_mode, log_every, on_nonfinite)
  if checkpoint_dir is not None and best_metric is not None:
    first_batch = next(iter(train_loader.epoch(0)))
    _check_best_metric(model, loss_fn, first_batch, best_metric, val_loader is not None)
  skip = on_nonfinite == 'skip' or (on_nonfinite is None and _skips_nonfinite(optimizer.opt_state))
  checkpoints = Checkpoints(checkpoint_dir) if checkpoint_dir is not None else None
  run = _Run(model, optimizer, train_loader, checkpoints=checkpoints, best_metric=best_metric,
             best_mode=best_mode, skip_nonfinite=skip, progress=progress)
  try:
    if checkpoints is not None and checkpoints.step('latest') is not None:
      if not resume:
        raise ValueError(
            f'checkpoint_dir: {checkpoints.directory} already holds a checkpoint (step '
            f'{checkpoints.step("latest")}) and resume=False; pass resume=True to continue it, '
            'or a new directory to start afresh'
        )
      run.resume()
    # One step function for the whole run; cached_partial skips re-walking the
    # model and optimizer graphs in Python on every call (errata 12).
    train_step = nnx.cached_partial(make_train_step(loss_fn), model, optimizer)
    eval_step = make_eval_step(loss_fn)
    steps_per_epoch = len(train_loader)
    run.bar = tqdm(total=epochs * steps_per_epoch, initial=min(run.step, epochs * steps_per_epoch),
                   unit='step', disable=not progress, dynamic_ncols=True)
    for epoch in range(run.epoch, epochs):
      run.bar.set_description(f'epoch {epoch + 1}/{epochs}')
      start = run.batch if epoch == run.epoch else 0
      for index, batch in enumerate(train_loader.epoch(epoch, start), start=start):
        run.record(train_step(batch))
        if run.step % log_every == 0:  # every log_every updates
          run.log()
        if checkpoint_every and run.step % checkpoint_every == 0 and index + 1 < steps_per_epoch:
          run.log()
          run.save(epoch, index + 1)
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
    if checkpoints is not None:
      checkpoints.close()
  return run.history
