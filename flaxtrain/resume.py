"""fit's checkpoint chore: open or resume a run in a checkpoint directory, and save it.

A :class:`RunCheckpoints` is what ``fit`` calls at its sync points. It owns
the :class:`flaxtrain.Checkpoints` of the run's directory and the metadata
that makes resuming exact: the position in the data, the history, the
counters of skipped steps, the loss-scale state, the best metric so far and
what defines the optimizer (its injected hyperparameters, and a fingerprint
of the updates it makes, which changes with a new schedule, clipping or
weight decay).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxtrain.checkpoint import CheckpointError
from flaxtrain.checkpoint import Checkpoints
from flaxtrain.history import History
from flaxtrain.history import HistoryLog

__all__ = ['FORMAT', 'Position', 'RunCheckpoints', 'optimizer_fingerprint']

FORMAT = 3  # version of the metadata fit() stores in a checkpoint

_PROBE_STEPS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 50_000, 200_000)


def _hyperparams(state: Any) -> dict[str, float]:
  """The numeric scalars under ``hyperparams`` in an optax state (``optax.inject_hyperparams``)."""
  found = {}
  for path, value in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path, simple=True, separator='/')
    if '/hyperparams/' in f'/{key}/' and np.ndim(value) == 0 and jnp.issubdtype(jnp.asarray(value).dtype, jnp.number):
      found[key] = float(value)
  return found


def _is_count(path: tuple[Any, ...]) -> bool:
  last = path[-1] if path else None
  return getattr(last, 'name', getattr(last, 'key', None)) == 'count'


def optimizer_fingerprint(tx: Any) -> list[list[float]]:
  """What ``tx`` does, as numbers: its updates of a fixed probe at fixed step counts.

  The probe holds one parameter of each of three sizes and gradients of
  three sizes, so a change in the learning rate or its schedule (peak,
  warmup, decay length), in clipping or in weight decay changes some of the
  numbers. Computed in one compiled call.

  Args:
    tx: an optax transformation.

  Returns:
    One row per probe step, of the update's three values.
  """
  params = {'w': jnp.array([0.5, -2.0, 3000.0], jnp.float32)}
  grads = {'w': jnp.array([1.0, -1000.0, 1e-3], jnp.float32)}

  @jax.jit
  def probe():
    rows = []
    state = tx.init(params)
    for step in _PROBE_STEPS:
      at = jax.tree_util.tree_map_with_path(
          lambda path, x: jnp.asarray(step, jnp.asarray(x).dtype) if _is_count(path) else x, state)
      rows.append(tx.update(grads, at, params)[0]['w'])
    return jnp.stack(rows)

  return np.asarray(probe(), np.float64).tolist()


class Position:
  """Where a run stands: the next epoch and batch, the steps done, and its history."""

  def __init__(self, steps_per_epoch: int):
    self.steps_per_epoch = steps_per_epoch
    self.epoch, self.batch, self.step = 0, 0, 0
    self.history = History()
    self.nonfinite_steps = 0
    self.first_nonfinite: int | None = None
    self.overflow_steps = 0
    self.loss_scale: dict[str, float] | None = None  # restored loss-scale state, if any

  def where(self, step: int) -> str:
    epoch, batch = divmod(step, self.steps_per_epoch)
    return f'epoch {epoch + 1}, batch {batch + 1}'


class RunCheckpoints:
  """The checkpoints of one ``fit`` run: opened (or resumed) once, saved at sync points, closed."""

  def __init__(self, directory: Any, *, keep: int, best_metric: str | None, best_mode: str,
               fingerprint: Mapping[str, Any], say: Any):
    self.checkpoints = Checkpoints(directory, keep=keep)
    self.best_metric, self.best_mode = best_metric, best_mode
    self.loader = dict(fingerprint)
    self.say = say
    self.best: dict[str, Any] | None = None
    self.hyperparams: dict[str, float] = {}
    self.updates: list[list[float]] = []
    self.log_file: HistoryLog | None = None

  @property
  def directory(self) -> Any:
    return self.checkpoints.directory

  def latest_path(self) -> Any:
    return self.checkpoints.path('latest')

  # Opening -------------------------------------------------------------------

  def open(self, model: nnx.Module, optimizer: nnx.Optimizer, position: Position, *, resume: bool, epochs: int,
           accept_new_hyperparams: bool, loss_scale: Mapping[str, float] | None) -> None:
    """Takes the writer lock, then resumes the run in the directory into ``position``, or starts it.

    Nothing is ever started afresh over checkpoints: a directory holding a
    latest checkpoint is resumed (or refused with ``resume=False``), and one
    holding anything else that matters (a best checkpoint, set-aside
    checkpoints, someone's files) is an error. Leftovers of a run that never
    completed its first checkpoint are cleared.
    """
    checkpoints = self.checkpoints
    checkpoints.acquire()  # one writer per directory, and a writability check, before any training
    fresh = nnx.Optimizer(model, optimizer.tx, wrt=optimizer.wrt)
    self.hyperparams = _hyperparams(nnx.to_pure_dict(nnx.state(fresh)))
    self.updates = optimizer_fingerprint(optimizer.tx)
    if checkpoints.step('latest') is not None:
      if not resume:
        raise ValueError(
            f'checkpoint_dir: {checkpoints.directory} already holds a checkpoint (step '
            f'{checkpoints.step("latest")}) and resume=False; pass resume=True to continue it, '
            'or a new directory to start afresh')
      self._resume(model, optimizer, position, epochs, accept_new_hyperparams, loss_scale)
      return
    found = checkpoints.blocking_contents()
    if found:
      raise ValueError(
          f'checkpoint_dir: {checkpoints.directory} holds {found[:5]} but no latest checkpoint to resume '
          'from, so a new run there could overwrite them. To start afresh, pass a new checkpoint_dir '
          "(or move those away yourself); to go on from the best checkpoint, load it with "
          "ft.restore_checkpoint(checkpoint_dir, model, optimizer, which='best') and fit into a new checkpoint_dir")
    removed = checkpoints.discard_leftovers()
    if removed:
      self.say(f'Cleared what an earlier run left in {checkpoints.directory} before its first checkpoint: '
               f'{removed[:3]}')
    self.log_file = HistoryLog(checkpoints.directory / 'history')

  def _verify(self, info: Any) -> None:
    """The check ``restore`` runs on each candidate before loading it: its history must read back.

    A history file cut short or corrupted inside the newest checkpoint's span
    makes that checkpoint unusable, like a failed checksum: ``restore`` then
    falls back to an older one, whose shorter history may still verify.
    """
    meta = info.metadata
    if meta.get('format') == FORMAT:  # another format is refused after the restore, with its own message
      HistoryLog.read(self.checkpoints.directory / 'history', meta['history'])

  def _resume(self, model: nnx.Module, optimizer: nnx.Optimizer, position: Position, epochs: int,
              accept: bool, loss_scale: Mapping[str, float] | None) -> None:
    """Restores the newest latest checkpoint that verifies, and the run's position."""
    checkpoints = self.checkpoints
    info = checkpoints.restore(model, optimizer, which='latest', verify=self._verify, warn=False)
    for step, reason in info.skipped:
      moved = checkpoints.set_aside('latest', step, reason)
      warnings.warn(
          f'checkpoint_dir: skipped the checkpoint of step {step}: {reason}. It was moved to {moved}; '
          f'resuming from step {info.step} instead', RuntimeWarning, stacklevel=4)
    if info.skipped:  # a best checkpoint of the abandoned steps stays, set aside, out of the new timeline's way
      checkpoints.set_aside_after(info.step, f'written after step {info.step}, by steps a resumed run redid')
    meta = info.metadata
    if meta.get('format') != FORMAT:
      raise ValueError(
          f'checkpoint_dir: the checkpoint at {info.path} was not written by this version of '
          f'flaxtrain.fit (metadata format {meta.get("format")!r}, expected {FORMAT})')
    if meta['loader'] != self.loader:
      raise ValueError(
          f'train_loader: differs from the one the checkpoint at {info.path} was trained with '
          f'({self.loader} now, {meta["loader"]} then), so the resumed run would not see '
          'the batches it would have seen; resume with the same loader, or use a new checkpoint_dir')
    epoch, batch = meta['epoch'], meta['batch']
    steps_per_epoch = position.steps_per_epoch
    if not (isinstance(epoch, int) and isinstance(batch, int) and 0 <= batch < steps_per_epoch
            and epoch * steps_per_epoch + batch == info.step):
      raise ValueError(
          f'checkpoint_dir: the checkpoint at {info.path} was saved at step {info.step}, but its '
          f'metadata puts it at epoch {epoch!r}, batch {batch!r} ({steps_per_epoch} steps per epoch); '
          'the two disagree, so its position cannot be trusted')
    history = HistoryLog.read(checkpoints.directory / 'history', meta['history'])
    if len(history) != info.step:
      raise ValueError(f'checkpoint_dir: the checkpoint at {info.path} was saved at step {info.step} but its '
                       f'history holds {len(history)} steps')
    self._check_optimizer(optimizer, meta, info.path, accept)
    self._check_loss_scale(meta.get('loss_scale'), loss_scale, info.path, accept)
    best = meta.get('best')
    if best and (best['metric'], best['mode']) != (self.best_metric, self.best_mode) \
        and self.best_metric is not None and checkpoints.step('best') is not None:
      raise ValueError(
          f"best_metric: the best checkpoint in {checkpoints.directory} was chosen by {best['metric']!r} "
          f"({best['mode']}), and this run would replace it by {self.best_metric!r} ({self.best_mode}); "
          f"pass best_metric={best['metric']!r}, best_mode={best['mode']!r} (or best_metric=None), "
          'or use a new checkpoint_dir')
    if best and (best['metric'], best['mode']) == (self.best_metric, self.best_mode):
      self.best = best
      if best['step'] == info.step and checkpoints.step('best') != info.step:
        checkpoints.save_best(info.step, model, optimizer, meta)  # the run stopped between the two copies
    checkpoints.adopt()  # the resumed run's checkpoints are its own: keep= may rotate them
    position.epoch, position.batch, position.step = epoch, batch, info.step
    position.history = history
    position.nonfinite_steps = meta['nonfinite_steps']
    position.first_nonfinite = meta['first_nonfinite']
    position.overflow_steps = meta.get('overflow_steps', 0)
    position.loss_scale = meta.get('loss_scale')
    self.log_file = HistoryLog(checkpoints.directory / 'history', meta['history'], history)
    if epochs < epoch or (epochs == epoch and batch > 0):
      done = f'{epoch} epochs' + (f' and {batch} batches' if batch else '')
      raise ValueError(
          f'epochs: the run in {checkpoints.directory} has already done {done} ({info.step} steps), '
          f'more than epochs={epochs}; epochs counts every epoch, those already done included, so '
          f'pass epochs > {epoch} to train on, or a new checkpoint_dir to start afresh')
    if epochs == epoch:
      self.say(f'The run in {checkpoints.directory} has already done its {epochs} epochs ({info.step} steps): '
               'nothing to train. Pass a larger epochs to train on.')
      return
    self.say(f'Resumed from {info.path}: {info.step} steps done, continuing with epoch '
             f'{epoch + 1}, batch {batch + 1} of {steps_per_epoch}')

  def _check_optimizer(self, optimizer: nnx.Optimizer, meta: Mapping[str, Any], path: Any, accept: bool) -> None:
    """The optimizer given must be the run's: the same injected hyperparameters and the same updates.

    Restoring overwrites the optimizer state, in which ``inject_hyperparams``
    keeps constant hyperparameters: without this check a new constant
    learning rate would be silently replaced by the checkpoint's, and a new
    schedule, clipping or weight decay would silently change the run.
    """
    given, stored = self.hyperparams, meta.get('hyperparams', {})
    changed = {k: (given[k], stored[k]) for k in sorted(given.keys() & stored.keys()) if given[k] != stored[k]}
    updates = np.asarray(self.updates, np.float64)
    old = np.asarray(meta.get('updates', self.updates), np.float64)
    differs = updates.shape != old.shape or not np.allclose(updates, old, rtol=1e-6, atol=0.0, equal_nan=True)
    if not changed and not differs:
      return
    if not accept:
      parts = [f'{key.rsplit("/", 1)[-1]} ({key}): {new:.6g} in the optimizer given, {old_value:.6g} in the '
               'checkpoint' for key, (new, old_value) in changed.items()]
      if differs and updates.shape == old.shape:
        row = int(np.argmax(np.any(~np.isclose(updates, old, rtol=1e-6, atol=0.0), axis=1)))
        parts.append(f'its updates differ from the saved run\'s (at optimizer step {_PROBE_STEPS[row]}: '
                     f'{updates[row].tolist()} now, {old[row].tolist()} then), so its learning-rate schedule, '
                     'clipping or weight decay changed')
      elif differs:
        parts.append('it is not built like the saved run\'s optimizer')
      raise ValueError(
          f'optimizer: differs from that of the run saved at {path}: {"; ".join(parts)}. Resuming would '
          'silently change the run; pass accept_new_hyperparams=True to train on with the optimizer given, '
          'or build the optimizer as before')
    if changed:
      self._set_hyperparams(optimizer, {k: new for k, (new, _) in changed.items()})
    self.say('Resuming with a changed optimizer: ' + (', '.join(
        f'{k.rsplit("/", 1)[-1]} {old_value:.6g} -> {new:.6g}' for k, (new, old_value) in changed.items())
        or 'new schedule, clipping or weight decay'))

  @staticmethod
  def _set_hyperparams(optimizer: nnx.Optimizer, values: Mapping[str, float]) -> None:
    """Sets the ``optax.inject_hyperparams`` values of ``optimizer``'s state, in place."""
    state = nnx.state(optimizer)
    pure = nnx.to_pure_dict(state)

    def replace(path: tuple[Any, ...], value: Any) -> Any:
      key = jax.tree_util.keystr(path, simple=True, separator='/')
      if key in values:
        return jnp.asarray(values[key], jnp.asarray(value).dtype)
      return value

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(replace, pure))
    nnx.update(optimizer, state)

  @staticmethod
  def _check_loss_scale(stored: Mapping[str, float] | None, given: Mapping[str, float] | None, path: Any,
                        accept: bool) -> None:
    if (stored is None) == (given is None) or accept:
      return
    what = ('was trained with dynamic loss scaling, and this run has none' if stored is not None else
            'was trained without loss scaling, and this run scales the loss')
    raise ValueError(f'loss_scale: the run saved at {path} {what}; pass the same loss_scale as before, or '
                     'accept_new_hyperparams=True to train on as this run is set up')

  # Saving ------------------------------------------------------------------

  def improved(self, metrics: Mapping[str, float], step: int) -> bool:
    """Whether ``metrics`` hold a new best ``best_metric`` (and remembers it)."""
    value = metrics.get(self.best_metric, math.nan) if self.best_metric is not None else math.nan
    if not math.isfinite(value):
      return False
    if self.best is not None:
      old = self.best['value']
      if (value <= old) if self.best_mode == 'max' else (value >= old):
        return False
    self.best = {'metric': self.best_metric, 'mode': self.best_mode, 'value': value, 'step': step}
    return True

  def save(self, model: nnx.Module, optimizer: nnx.Optimizer, position: Position,
           metrics: Mapping[str, float] | None = None) -> None:
    """Writes the latest checkpoint at ``position`` (and the best, if ``metrics`` improved)."""
    best = metrics is not None and self.improved(metrics, position.step)
    try:
      metadata = {
          'format': FORMAT, 'epoch': position.epoch, 'batch': position.batch, 'loader': self.loader,
          'best': self.best, 'nonfinite_steps': position.nonfinite_steps,
          'first_nonfinite': position.first_nonfinite, 'hyperparams': self.hyperparams,
          'updates': self.updates, 'overflow_steps': position.overflow_steps,
          'loss_scale': position.loss_scale,
          'history': self.log_file.write(position.history),  # appends only the new rows
      }
      self.checkpoints.save(position.step, model, optimizer, metadata=metadata, best=best)
    except Exception as error:  # a full disk, a vanished directory, ...: keep the history
      cause = error.__cause__ if isinstance(error, CheckpointError) and error.__cause__ is not None else error
      failure = CheckpointError(
          f'checkpoint_dir: saving the checkpoint of step {position.step} to {self.checkpoints.directory} '
          f'failed ({type(cause).__name__}: {str(cause).strip()[:300]}). The history so far is in '
          'this error\'s .history; the previous checkpoints are untouched')
      failure.history = position.history
      raise failure from cause

  def close(self) -> None:
    """Closes the history file and releases the writer lock (the lock even if closing the file fails)."""
    try:
      if self.log_file is not None:
        self.log_file.close()
    finally:
      self.checkpoints.close()
