"""fit(): the training loop of the notebooks, on a functional state, with its chores done carefully.

The loop itself is short and reads top to bottom:

1. Check everything before any device work (:mod:`flaxtrain.preflight`).
2. Split ``(model, optimizer)`` once (``TrainStep.split``) and take their
   arrays out as a plain list.
3. Run the one compiled train step, :func:`flaxtrain.steps.train_arrays`, on
   that list, donating it each time; ``steps_per_dispatch=K`` runs K steps
   per call in a ``jax.lax.scan``. The step appends its metrics to a buffer
   on the device, so no step waits for the host.
4. At sync points the objects are made current (``TrainState.write``) and
   the chores run: ``log_every`` steps after the last log, and at the end of
   each epoch, the buffer comes to the host in one transfer (progress bar,
   finite check, live plot); at the end of each
   epoch, validation and the checkpoint; on an interruption, a non-finite
   stop and at the end, the write-back.

What it guarantees:

* **Exact resume.** A checkpoint holds the model (RNG state included), the
  optimizer, the step, the position in the data (epoch, batch) and the
  history. Since the data order of an epoch depends only on the loader's seed
  and the epoch, a resumed run sees the same batches and draws the same
  Dropout masks: training 2N epochs in two calls of N gives the same
  parameters, bit for bit, as one call of 2N.
* **Ctrl-C is safe.** An interrupt is taken between two dispatches, never
  inside one; ``fit`` writes the arrays back, returns the history so far, and
  the last complete checkpoint stays on disk for the next call to resume.
* **Non-finite losses stop the run** with an error naming the first bad step
  and the last good checkpoint, unless the optimizer skips bad updates
  (``optax.apply_if_finite``) and the run is told to go on.
* **One compilation per structure.** The step, the eval step and the checks
  are ``jax.jit`` functions whose static argument is the structure, so a
  second ``fit`` on the same model, or on a new model of the same
  structure, compiles nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.std import tqdm

from flaxtrain import precision
from flaxtrain.chores import Progress
from flaxtrain.chores import StepRecords
from flaxtrain.data import DataLoader
from flaxtrain.evaluation import evaluate
from flaxtrain.evaluation import make_eval_step
from flaxtrain.history import History
from flaxtrain.live import LivePlot
from flaxtrain.live import as_live_plot
from flaxtrain.losses import LossFn
from flaxtrain.parallel import DataParallel
from flaxtrain.parallel import as_parallel
from flaxtrain.preflight import check_best_metric
from flaxtrain.preflight import check_data
from flaxtrain.preflight import check_fit_arguments
from flaxtrain.preflight import check_parallel_loaders
from flaxtrain.preflight import fingerprint
from flaxtrain.preflight import skips_nonfinite
from flaxtrain.preflight import val_batches
from flaxtrain.resume import Position
from flaxtrain.resume import RunCheckpoints
from flaxtrain.steps import RESERVED
from flaxtrain.steps import DeviceBatches
from flaxtrain.steps import as_device_batches
from flaxtrain.steps import MetricsBuffer
from flaxtrain.steps import classification_loss
from flaxtrain.steps import compiled_step
from flaxtrain.steps import copy_arrays
from flaxtrain.steps import make_train_step
from flaxtrain.steps import many_mode
from flaxtrain.steps import stack_batches

__all__ = ['fit']

DEVICE_DATA_BYTES = 256 * 2**20  # a DataLoader's arrays up to this size go to the device once per fit

_all_finite = jax.jit(precision.all_finite)


def stack_size(index: int, step: int, steps_per_epoch: int, per_dispatch: int, checkpoint_every: int | None) -> int:
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


# Where the batches come from ------------------------------------------------------


class HostBatches:
  """Batches from ``loader.epoch(epoch, start)`` on the host; K of them stacked for a many-step dispatch.

  On one device each batch goes to the step as :func:`flaxtrain.steps.as_device_batches`
  makes it, as every train step does: the same program as :class:`EpochOnDevice`'s.
  """

  def __init__(self, loader: Any, parallel: DataParallel | None):
    self.loader = loader
    self.gather = parallel is None
    self.batches: Iterator[Any] = iter(())
    self.orders: dict[tuple[int, int], np.ndarray] = {}  # the identity orders of as_device_batches

  def start(self, epoch: int, index: int) -> None:
    self.batches = self.loader.epoch(epoch, index)

  def _input(self, batch: Any, steps: int) -> Any:
    return as_device_batches(batch, None if steps == 1 else steps, self.orders) if self.gather else batch

  def take(self, steps: int) -> list[tuple[int, Any]]:
    """``[(steps, input)]`` for the step; a ragged chunk (a custom loader) runs as single steps."""
    if steps == 1:
      return [(1, self._input(next(self.batches), 1))]
    chunk = [next(self.batches) for _ in range(steps)]
    shape = lambda batch: {k: (np.shape(v), getattr(v, 'dtype', None)) for k, v in batch.items()}
    if all(shape(batch) == shape(chunk[0]) for batch in chunk[1:]):
      return [(steps, self._input(stack_batches(chunk), steps))]
    return [(1, self._input(batch, 1)) for batch in chunk]

  def advance(self, position: Any) -> None:
    pass


class EpochOnDevice:
  """A DataLoader's data on the device, sent once; each epoch sends only its order of examples.

  The step gathers each batch's rows itself (:class:`flaxtrain.steps.DeviceBatches`),
  so no batch is sliced, stacked or copied on the host: the same batches as
  ``loader.epoch``, bit for bit.
  """

  def __init__(self, loader: DataLoader):
    self.loader = loader
    self.data = jax.device_put(dict(loader.data))  # no eager op: nothing to compile in a fresh process
    self.cursor: DeviceBatches | None = None

  @staticmethod
  def suits(loader: Any, parallel: DataParallel | None) -> bool:
    """Whether ``loader`` is a plain DataLoader of training batches small enough to send whole."""
    return (parallel is None and isinstance(loader, DataLoader) and type(loader).epoch is DataLoader.epoch
            and type(loader).order is DataLoader.order and loader.remainder == 'drop'
            and sum(v.nbytes for v in loader.data.values()) <= DEVICE_DATA_BYTES)

  def start(self, epoch: int, index: int) -> None:
    size, batches = self.loader.batch_size, len(self.loader)
    order = self.loader.order(epoch)[:batches * size].reshape(batches, size).astype(np.int32)
    self.cursor = DeviceBatches(self.data, jnp.asarray(order), np.int32(index))

  def take(self, steps: int) -> list[tuple[int, Any]]:
    return [(steps, self.cursor)]

  def advance(self, position: jax.Array) -> None:
    self.cursor = self.cursor._replace(position=position)


# Deferred interrupts --------------------------------------------------------------


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[Any]:
  """Within the block, Ctrl-C sets a flag that the loop polls between dispatches.

  A KeyboardInterrupt raised inside a dispatch could land after the step
  donated its arrays and before the new ones are stored, losing the state.
  So the first Ctrl-C only asks the loop to stop at the next safe point (it
  polls ``asked()`` before each dispatch); a second one raises at once. Off
  the main thread, where Python delivers no signals, nothing changes.
  """
  asked = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield asked.is_set
    return

  def handler(signum: int, frame: Any) -> None:
    if asked.is_set():
      raise KeyboardInterrupt
    asked.set()

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield asked.is_set
  finally:
    signal.signal(signal.SIGINT, previous)


# The loop ---------------------------------------------------------------------


def _default_best_metric(best_metric: str | None, aux_names: list[str], val_loader: Any) -> str | None:
  """``'auto'``: ``'val_accuracy'`` when there is validation and the loss reports accuracy, else None."""
  if best_metric != 'auto':
    return best_metric
  return 'val_accuracy' if val_loader is not None and 'accuracy' in aux_names else None


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
    best_metric: str | None = 'auto',
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
  compiled train step, then evaluates on ``val_loader`` in evaluation mode
  (Dropout off, BatchNorm on running averages), records the epoch's metrics
  (``train_<name>``: the mean over the epoch's steps; ``val_<name>``) and,
  with a ``checkpoint_dir``, writes the latest checkpoint and, when
  ``best_metric`` improved, the best one.

  With ``resume=True`` and a checkpoint in ``checkpoint_dir``, the model and
  optimizer are first restored from the latest checkpoint and training goes
  on from the batch after it, up to ``epochs`` epochs in total: calling
  ``fit(..., epochs=2 * n)`` after ``fit(..., epochs=n)`` gives what one call
  with ``epochs=2 * n`` gives.

  Between sync points the model and optimizer objects are not current:
  ``fit`` steps on a copy of their arrays, donated to each step, and writes
  it back at validation, checkpoints, an interruption, an error and the end.
  Arrays shared with the objects before ``fit`` (an ``nnx.clone``, a kept
  ``w = model.out.kernel[...]``) stay valid. A plain
  :class:`flaxtrain.DataLoader`'s data (up to 256 MiB) is sent to the device
  once, and the step gathers each batch there: the same batches, without
  host work per step.

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
      ``'auto'`` (the default): ``'val_accuracy'`` when there is a
      ``val_loader`` and the loss reports ``accuracy``, else None.
    best_mode: ``'max'`` or ``'min'``: whether larger ``best_metric`` is better.
    log_every: bring step metrics to the host, check them and update the
      progress bar at most this many steps after the last time (which is
      also done at the end of every epoch). Each is a sync point: the host
      waits for the device.
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
      way, a directory holding checkpoints or files of its own but no usable
      latest checkpoint is an error: nothing is started afresh over it,
      deleted or overwritten (only the leftovers of a run stopped before its
      first checkpoint are cleared).
    keep: how many latest checkpoints to keep (older ones of this run are
      deleted); more let a run fall back past a corrupt one.
    accept_new_hyperparams: when resuming, train on with the optimizer given
      (a new constant learning rate, schedule, clipping or weight decay, or a
      loss scale turned on or off) where it differs from the checkpoint's
      run; by default that is an error naming the difference.
    steps_per_dispatch: run this many steps per call to the device, in one
      ``jax.lax.scan`` (see :func:`flaxtrain.make_train_step`). The results
      are those of single steps; a stack never crosses an epoch's end or a
      ``checkpoint_every`` position, and the steps left over run one by one,
      so checkpoints, resuming and the history stay per batch. On the CPU
      backend a step holding a convolution runs single steps (a compiled
      loop slows XLA's CPU convolutions).
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
      rounding. None (the default): one device.

  Returns:
    The :class:`flaxtrain.History` (step and epoch metrics), including what
    the resumed run recorded before. Steps count from 0, as optax counts
    updates: the metrics of update ``i`` are recorded at step ``i``, and an
    epoch is recorded at the number of steps done. After a KeyboardInterrupt,
    the history so far; the last complete checkpoint is untouched.

  Raises:
    FloatingPointError: on a non-finite loss or parameters; the message
      names the step and the last good checkpoint, and the error carries
      ``step``, ``checkpoint`` and ``history`` attributes.
    ValueError: a checkpoint that does not match ``model``, ``optimizer``
      (its hyperparameters, schedule or loss scaling included) or
      ``train_loader``, or that cannot be read and verified; batches that do
      not fit ``model`` and ``loss_fn``, labels outside ``[0, num_classes)``,
      a ``val_loader`` that would skip examples or a ``loss_fn`` that ignores
      a padded batch's ``mask``; all before any training.
    CheckpointError: ``checkpoint_dir`` is in use by another run or cannot
      be written (before any training), or a save failed (the error's
      ``history`` holds the history so far).

  Example:
    >>> history = ft.fit(model, optimizer, ft.DataLoader(splits.train, 64),   # doctest: +SKIP
    ...                  epochs=10, val_loader=ft.DataLoader(splits.val, 128, shuffle=False,
    ...                  remainder='pad'), checkpoint_dir='runs/cnn')
    >>> ft.plot_history(history, 'accuracy')                                  # doctest: +SKIP
  """
  # 1. Check everything before any device work: the arguments, the split of (model, optimizer) (that
  # the optimizer fits the model) and the data, traced through the train step itself.
  check_fit_arguments(model, optimizer, train_loader, epochs, val_loader, loss_fn, checkpoint_dir,
                      checkpoint_every, best_metric, best_mode, log_every, on_nonfinite, keep, resume,
                      accept_new_hyperparams, steps_per_dispatch)
  parallel = as_parallel(parallel)
  check_parallel_loaders(parallel, train_loader, val_loader)
  train_step = make_train_step(loss_fn, loss_scale=loss_scale, parallel=parallel)  # checks both
  eval_step = make_eval_step(loss_fn, parallel=parallel)
  state = train_step.split(model, optimizer, for_loop=True)  # nothing placed on devices yet
  if not state.fast:
    raise ValueError('model: fit needs Variables that hold plain arrays (no refs, no hijax Variables); '
                     'train such a model with your own loop around ft.make_train_step')
  first = next(iter(train_loader.epoch(0)))
  names = check_data(state, loss_fn, train_loader, val_loader, eval_step, first, loss_scale)
  aux_names = [name for name in names if name not in RESERVED]
  best_metric = _default_best_metric(best_metric, aux_names, val_loader)
  if checkpoint_dir is not None and best_metric is not None:
    check_best_metric(aux_names, best_metric, val_loader is not None)

  steps_per_epoch = len(train_loader)
  position = Position(steps_per_epoch)
  chores = Progress(progress)
  records = StepRecords(position, min_scale=None if loss_scale is None else float(loss_scale.min_scale),
                        skip_nonfinite=on_nonfinite == 'skip' or (on_nonfinite is None
                                                                  and skips_nonfinite(optimizer.opt_state)),
                        checkpoints=checkpoint_dir is not None)
  live = as_live_plot(live_plot)
  saver = None if checkpoint_dir is None else RunCheckpoints(
      checkpoint_dir, keep=keep, best_metric=best_metric, best_mode=best_mode,
      fingerprint=fingerprint(train_loader), say=chores.say)
  arrays: list[Any] | None = None  # the run's arrays between sync points: the objects are stale
  buffer: MetricsBuffer | None = None
  params: list[int] = []
  pending: list[int] = []  # the steps whose metrics wait in the buffer
  logged = 0  # the step count at the last log

  def log(check: bool = True) -> None:
    """The buffered metrics to the host in one transfer; the progress bar, the finite check, the live plot."""
    nonlocal buffer, logged
    if not pending:
      return
    values, finite = jax.device_get((buffer.values, _all_finite([arrays[i] for i in params])))
    values = values[:len(pending)]
    steps, rows = list(pending), [dict(zip(names, row)) for row in values.tolist()]
    pending.clear()
    logged = position.step
    buffer = buffer._replace(count=np.int32(0))
    loss = records.add(steps, rows, values_finite=bool(np.isfinite(values).all()), params_finite=bool(finite),
                       check=check, checkpoint=_checkpoint_path(saver))
    extra = {'skipped': position.nonfinite_steps} if position.nonfinite_steps else {}
    if position.overflow_steps:
      extra['overflow'] = position.overflow_steps
    chores.advance(len(steps), loss=f'{loss:.4f}', **extra)
    if live is not None:
      live.update(position.history)

  def sync() -> None:
    """Makes the model and optimizer current, and the loss-scale state the checkpoint saves."""
    state.write(arrays)
    position.loss_scale = _scale_state(loss_scale)

  try:
    with deferred_interrupts() as interrupted:
      # 2. Place, resume, take the arrays out. With parallel, both objects go on the mesh before a
      # resume, which restores into the same Variables at these placements.
      state.place()
      if saver is not None:
        saver.open(model, optimizer, position, resume=resume, epochs=epochs,
                   accept_new_hyperparams=accept_new_hyperparams, loss_scale=_scale_state(loss_scale))
        records.resume_epoch()
        loss_scale = _restored_scale(loss_scale, position.loss_scale)
      per_dispatch = steps_per_dispatch
      if per_dispatch > 1 and many_mode(state.spec, state.read(), stack_batches([first]), loss_scale) == 'loop':
        per_dispatch = 1  # a convolution on the CPU: many steps per call would be slower
      params = [i for i, v in enumerate(state.variables) if isinstance(v, nnx.Param)]
      source = EpochOnDevice(train_loader) if EpochOnDevice.suits(train_loader, parallel) else HostBatches(train_loader, parallel)
      capacity = 1 << (log_every + per_dispatch - 1).bit_length()  # a power of two: fewer shapes to compile for
      buffer = MetricsBuffer(np.zeros((capacity, len(names)), np.float32), np.int32(0))
      # fit donates the arrays to each step: it steps on its own copy, so whatever shares the
      # objects' arrays (a clone, an array a user kept) stays valid; the objects take the copy
      # now, so the originals can be freed, and hold the run's arrays from each sync on.
      arrays = copy_arrays(state.read())
      state.write(arrays)
      step = compiled_step(donate=True)

      # 3. The loop: dispatches of one or K steps on the arrays, chores at the sync points.
      chores.start(epochs * steps_per_epoch, position.step)
      logged = position.step
      for epoch in range(position.epoch, epochs):
        chores.epoch(epoch, epochs)
        index = position.batch if epoch == position.epoch else 0
        source.start(epoch, index)
        while index < steps_per_epoch:
          if interrupted():
            raise KeyboardInterrupt
          stacked = stack_size(index, position.step, steps_per_epoch, per_dispatch, checkpoint_every)
          for steps, batch in source.take(stacked):
            arrays, buffer, loss_scale, position_after = step(
                arrays, batch, loss_scale, buffer, spec=state.spec, steps=None if steps == 1 else steps)
            source.advance(position_after)
            pending.extend(range(position.step, position.step + steps))
            position.step += steps
          index += stacked
          position.batch = index
          if position.step - logged >= log_every:  # log_every steps since the last log (an epoch's end included)
            log()
          if checkpoint_every and position.step % checkpoint_every == 0 and index < steps_per_epoch:
            log()
            sync()
            if saver is not None:
              saver.save(model, optimizer, position)
        # 4. The end of an epoch: log, write back, validate, record, checkpoint.
        log()
        sync()
        metrics = records.epoch_metrics()
        if val_loader is not None:
          results = evaluate(eval_step, model, val_batches(val_loader), check_mask=False)
          metrics.update({f'val_{k}': v for k, v in results.items() if k != 'count'})
        position.history.record_epoch(epoch, metrics, step=position.step)
        position.epoch, position.batch = epoch + 1, 0
        chores.advance(0, **{k.replace('accuracy', 'acc'): f'{v:.4f}' for k, v in metrics.items()
                              if k in ('val_loss', 'val_accuracy')})
        if live is not None:
          live.update(position.history, force=True)
        if saver is not None:
          saver.save(model, optimizer, position, metrics)
  except KeyboardInterrupt:
    log(check=False)
    path = _checkpoint_path(saver)
    tqdm.write(
        f'Interrupted after {position.step} steps. Returning the history so far. '
        + (f'The last complete checkpoint is {path}; call fit again with the same '
           'checkpoint_dir to resume from it.' if path else 'No checkpoint was written.'))
  finally:
    if arrays is not None:
      state.write(arrays)  # the objects are current whatever happened
    chores.close()
    if saver is not None:
      saver.close()  # releases the writer lock
  return position.history


def _checkpoint_path(saver: RunCheckpoints | None) -> Any:
  return saver.latest_path() if saver is not None else None


def _scale_state(loss_scale: precision.DynamicLossScale | None) -> dict[str, float] | None:
  """The loss-scale state as plain numbers for the metadata, or None."""
  if loss_scale is None:
    return None
  return {'scale': float(loss_scale.scale), 'good_steps': int(loss_scale.good_steps)}


def _restored_scale(loss_scale: precision.DynamicLossScale | None,
                    stored: Mapping[str, float] | None) -> precision.DynamicLossScale | None:
  """``loss_scale`` with the state a resumed checkpoint saved, so resuming stays exact."""
  if loss_scale is None or stored is None:
    return loss_scale
  return loss_scale.replace(scale=jnp.asarray(stored['scale'], jnp.float32),
                            good_steps=jnp.asarray(stored['good_steps'], jnp.int32))
