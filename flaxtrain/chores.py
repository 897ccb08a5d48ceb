"""The small chores ``fit`` does at its sync points, each an object the loop calls itself.

In the shape of CLU's periodic actions, not a callback framework: the loop
decides when (``log_every`` steps after the last log, at the end of an epoch), the chore
knows what.

* :class:`Progress`: the progress bar, with the running loss and the
  validation metrics.
* :class:`StepRecords`: the step metrics that reached the host: appended to
  the history, averaged per epoch, and checked for NaN and infinity (the
  finite check).

The third and fourth chores live elsewhere: the live plot is a
:class:`flaxtrain.LivePlot` and the checkpoints a
:class:`flaxtrain.resume.RunCheckpoints`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.std import tqdm

from flaxtrain.live import progress_bar
from flaxtrain.resume import Position

__all__ = ['Progress', 'StepRecords']


def _finite_mean(values: Sequence[float]) -> float:
  kept = [v for v in values if math.isfinite(v)]
  return float(np.mean(kept)) if kept else math.nan


class Progress:
  """fit's progress bar: epoch, steps, running loss and the validation metrics."""

  def __init__(self, enabled: bool):
    self.enabled = enabled
    self.bar: Any = None
    self.postfix: dict[str, Any] = {}

  def say(self, message: str) -> None:
    """A line above the bar (or nothing when progress is off)."""
    if self.enabled:
      tqdm.write(message)

  def start(self, total: int, done: int) -> None:
    self.bar = progress_bar(total, initial=min(done, total), unit='step', disable=not self.enabled)

  def epoch(self, epoch: int, epochs: int) -> None:
    if self.bar is not None:
      self.bar.set_description(f'epoch {epoch + 1}/{epochs}', refresh=False)  # drawn at the next update

  def advance(self, steps: int, **postfix: Any) -> None:
    """``steps`` more steps done; ``postfix`` updates what is shown after the bar."""
    self.postfix.update(postfix)
    if self.bar is not None:
      self.bar.set_postfix(self.postfix, refresh=False)
      self.bar.update(steps)  # tqdm redraws at most ten times a second

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class StepRecords:
  """The finite check and the epoch means, on step metrics that reached the host.

  Args:
    position: the run's :class:`flaxtrain.resume.Position` (history and counters).
    skip_nonfinite: the optimizer skips non-finite updates itself
      (``optax.apply_if_finite``): such steps are counted, not errors.
    min_scale: with loss scaling, the smallest scale; a step whose gradients
      overflowed above it was skipped on purpose by the step.
  """

  def __init__(self, position: Position, *, skip_nonfinite: bool, min_scale: float | None,
               checkpoints: bool = False):
    self.position = position
    self.checkpoints = checkpoints  # whether the run writes checkpoints at all
    self.skip_nonfinite = skip_nonfinite
    self.min_scale = min_scale
    self.epoch_rows: list[dict[str, float]] = []

  def resume_epoch(self) -> None:
    """Takes back the rows of the current epoch that a resumed run recorded before its checkpoint."""
    first = self.position.epoch * self.position.steps_per_epoch
    self.epoch_rows = [{k: v for k, v in row.items() if k != 'step'}
                       for row in self.position.history.state_dict()['steps']
                       if row['step'] >= first and not _nonfinite(row)]

  def _overflow_skipped(self, row: Mapping[str, float]) -> bool:
    """A step that loss scaling skipped on purpose: gradients overflowed at a scale that can still shrink."""
    if self.min_scale is None or row.get('grads_finite', 1.0) != 0.0:
      return False
    return math.isfinite(row['loss']) and row['loss_scale'] > self.min_scale

  def add(self, steps: list[int], rows: list[dict[str, float]], *, values_finite: bool,
          params_finite: bool, checkpoint: Any, check: bool = True) -> float:
    """Records ``rows`` (the metrics of ``steps``); raises FloatingPointError on a real non-finite step.

    Returns:
      The mean finite loss of these rows (for the progress bar).
    """
    position = self.position
    if values_finite:  # the common case: no per-row checks
      bad = []
      self.epoch_rows.extend(rows)
    else:
      overflow = [self._overflow_skipped(row) for row in rows]
      position.overflow_steps += sum(overflow)
      bad = [(step, row) for step, row, expected in zip(steps, rows, overflow) if _nonfinite(row) and not expected]
      self.epoch_rows.extend(row for row in rows if not _nonfinite(row))  # epoch means count the steps that trained
    position.history.extend_rows(steps, rows)
    if bad:
      position.nonfinite_steps += len(bad)
      if position.first_nonfinite is None:
        position.first_nonfinite = bad[0][0]
    if check:
      self.check(steps, bad, params_finite, checkpoint)
    return _finite_mean([row['loss'] for row in rows])

  def check(self, steps: list[int], bad: list[tuple[int, Mapping[str, float]]], params_finite: bool,
            checkpoint: Any) -> None:
    position = self.position
    if bad and not self.skip_nonfinite:
      step, row = bad[0]
      if _nonfinite(row) == 'loss':
        what = f'the loss was {row["loss"]} at step {step} ({position.where(step)})'
      else:
        what = (f'the gradients were not finite at step {step} ({position.where(step)}): their norm was '
                f'{row["grad_norm"]}, although the loss was {row["loss"]}')
      raise self.error(step, what, checkpoint)
    if not params_finite:
      if self.skip_nonfinite and position.first_nonfinite is not None:
        raise self.error(position.first_nonfinite, (
            'the parameters became non-finite: optax.apply_if_finite skips at most '
            'max_consecutive_errors bad steps in a row, then applies the update anyway. '
            f'The first step with a non-finite loss or gradient was step {position.first_nonfinite} '
            f'({position.where(position.first_nonfinite)})'), checkpoint)
      raise self.error(steps[0], (
          f'the parameters became non-finite between step {steps[0]} ({position.where(steps[0])}) '
          f'and step {steps[-1]}, although every loss and gradient norm was finite'), checkpoint)

  def error(self, step: int, what: str, checkpoint: Any) -> FloatingPointError:
    """The FloatingPointError ``fit`` raises, carrying ``step``, ``checkpoint`` and ``history``."""
    where = (f'The last good checkpoint is {checkpoint} (nothing after it was saved).' if checkpoint else
             'No checkpoint was written' + ('.' if self.checkpoints else ' (checkpoint_dir=None).'))
    error = FloatingPointError(
        f"{what}. {where} Check that step's batch and the learning rate; to skip such steps "
        "instead, wrap the optimizer in optax.apply_if_finite and pass on_nonfinite='skip'.")
    error.step, error.checkpoint, error.history = step, checkpoint, self.position.history
    return error

  def epoch_metrics(self) -> dict[str, float]:
    """``train_<name>``: the mean over the epoch's steps that trained; then starts a new epoch."""
    names = {k for row in self.epoch_rows for k in row} - {'learning_rate', 'loss_scale', 'grads_finite'}
    metrics = {f'train_{k}': _finite_mean([row[k] for row in self.epoch_rows if k in row]) for k in sorted(names)}
    self.epoch_rows = []
    return metrics


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
