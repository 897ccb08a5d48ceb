"""A learning-rate range test: the loss as the rate grows exponentially.

Train a copy of the model for a few hundred steps while the learning rate
rises from ``min_lr`` to ``max_lr`` by the same factor every step, and record
the loss. At first the rate is too small to change anything; then the loss
falls, faster and faster; past some rate the steps overshoot and the loss
turns up and diverges. A good peak rate lies below where the loss is lowest.

The user's model and optimizer are never touched: the test trains an
``nnx.clone`` of the model with a fresh optimizer.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib import pyplot as plt
from matplotlib.axes import Axes

from flaxtrain import checks
from flaxtrain.steps import LossFn
from flaxtrain.steps import classification_loss
from flaxtrain.steps import make_train_step

__all__ = ['LRFinderResult', 'find_learning_rate', 'plot_lr_finder']


@dataclasses.dataclass(frozen=True)
class LRFinderResult:
  """What :func:`find_learning_rate` measured.

  Attributes:
    learning_rates: the rate of each step taken, increasing.
    losses: the training loss of each step (before its update).
    smoothed: the losses smoothed by a bias-corrected exponential moving
      average (``smoothing``), which the suggestion and the stop rule use.
    suggestion: the suggested peak learning rate: the rate at the lowest
      smoothed loss, divided by ``10``.
    diverged: True if the sweep stopped before ``max_lr`` because the loss
      ran away: the smoothed loss rose above ``diverge_factor`` times its
      lowest value, or a loss was not finite. That is the usual end of a
      healthy range test (the rate grew too large, which is what the test
      looks for), not an error: the suggestion is taken from below that
      point. False means the sweep reached ``max_lr`` without the loss
      turning up; if the plot has not turned yet, raise ``max_lr``.
  """

  learning_rates: np.ndarray
  losses: np.ndarray
  smoothed: np.ndarray
  suggestion: float
  diverged: bool

  @property
  def best_learning_rate(self) -> float:
    """The rate at which the smoothed loss was lowest (ten times the suggestion)."""
    return float(self.learning_rates[int(np.argmin(self.smoothed))])

  def plot(self, ax: Axes | None = None) -> Axes:
    """Same as :func:`plot_lr_finder` on this result."""
    return plot_lr_finder(self, ax=ax)


def _batches(loader: Any) -> Iterator[Mapping[str, Any]]:
  """Batches without end: epoch after epoch of a DataLoader, or the iterable again and again."""
  epoch = 0
  while True:
    found = False
    for batch in (loader.epoch(epoch) if hasattr(loader, 'epoch') else loader):
      found = True
      yield batch
    if not found:
      raise ValueError('loader: expected at least one batch, got none')
    epoch += 1


def _check_arguments(model, make_tx, loader, min_lr, max_lr, num_steps, smoothing, diverge_factor):
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  if not callable(make_tx):
    raise TypeError(
        'make_tx: expected a function learning_rate -> optax.GradientTransformation such as '
        f'optax.adam, got {make_tx!r}')
  if not isinstance(loader, Iterable) or (not hasattr(loader, 'epoch') and iter(loader) is loader):
    raise TypeError(
        'loader: expected a flaxtrain.DataLoader or a list of batches (something that can be '
        f'iterated again), got {type(loader).__name__}')
  min_lr = checks.check_real('min_lr', min_lr, expected='a number > 0', valid=lambda v: v > 0)
  max_lr = checks.check_real('max_lr', max_lr, expected=f'a number > min_lr ({min_lr})',
                              valid=lambda v: v > min_lr)
  checks.check_int('num_steps', num_steps, minimum=10)
  checks.check_real('smoothing', smoothing, expected='a number in [0, 1)', valid=lambda v: 0 <= v < 1)
  checks.check_real('diverge_factor', diverge_factor, expected='a number > 1', valid=lambda v: v > 1)
  return min_lr, max_lr


def find_learning_rate(
    model: nnx.Module,
    make_tx: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
    loader: Iterable[Mapping[str, Any]],
    *,
    loss_fn: LossFn = classification_loss,
    min_lr: float = 1e-5,
    max_lr: float = 1.0,
    num_steps: int = 200,
    smoothing: float = 0.9,
    diverge_factor: float = 4.0,
) -> LRFinderResult:
  """Runs a learning-rate range test on a copy of ``model``.

  Step ``i`` of ``num_steps`` trains with the rate
  ``min_lr * (max_lr / min_lr) ** (i / (num_steps - 1))``. The run stops
  early once the smoothed loss exceeds ``diverge_factor`` times its minimum,
  or a loss is not finite. Each step's loss comes to the host (a few hundred
  small transfers: this is a short diagnostic, not a training loop).

  The suggestion rule: the rate at which the smoothed loss was lowest,
  divided by 10. At the minimum the loss has stopped improving and is about
  to turn; a rate ten times smaller still falls fast and leaves room for the
  rate to be too high early in training. Read the plot too: the rule assumes
  the curve has the usual flat-fall-rise shape.

  Args:
    model: the model to test; it is copied (``nnx.clone``) and left unchanged.
    make_tx: builds the optimizer from a learning rate or schedule, e.g.
      ``optax.adam`` or ``lambda lr: ft.make_optimizer('sgd', lr, momentum=0.9)``.
    loader: training batches: a :class:`flaxtrain.DataLoader` (its epochs are
      used in turn) or a list of batches (cycled).
    loss_fn: ``loss_fn(model, batch) -> (loss, aux)``.
    min_lr: the first rate, > 0.
    max_lr: the last rate, > ``min_lr``.
    num_steps: the number of steps, >= 10.
    smoothing: the decay of the moving average of the loss, in [0, 1).
    diverge_factor: stop when the smoothed loss exceeds this multiple (> 1)
      of its lowest value.

  Warns:
    RuntimeWarning: the smoothed loss never fell below its first value (the
      suggestion then means nothing).

  Returns:
    An :class:`LRFinderResult` with the rates, the raw and smoothed losses,
    the suggested rate and ``diverged``: whether the sweep ended early on a
    running-away loss (the normal end of a sweep; see :class:`LRFinderResult`).

  Example:
    >>> result = ft.find_learning_rate(model, optax.adam, ft.DataLoader(splits.train, 64))  # doctest: +SKIP
    >>> result.plot(); result.suggestion                                                    # doctest: +SKIP
  """
  min_lr, max_lr = _check_arguments(model, make_tx, loader, min_lr, max_lr, num_steps, smoothing,
                                    diverge_factor)
  ratio = max_lr / min_lr

  def schedule(step):
    return min_lr * ratio ** (jnp.minimum(step, num_steps - 1) / (num_steps - 1))

  tx = make_tx(schedule)
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError('make_tx: expected a function that returns an optax.GradientTransformation (e.g. '
                    f'optax.adam, or lambda lr: optax.sgd(lr, momentum=0.9)), but make_tx(schedule) returned '
                    f'{type(tx).__name__}')
  copy = nnx.clone(model)
  optimizer = nnx.Optimizer(copy, tx, wrt=nnx.Param)
  train_step = make_train_step(loss_fn)
  rates, losses, smoothed = [], [], []
  average, diverged = 0.0, False
  for step, batch in zip(range(num_steps), _batches(loader)):
    loss = float(train_step(copy, optimizer, batch)['loss'])  # host sync: needed to stop on divergence
    rates.append(min_lr * ratio ** (step / (num_steps - 1)))
    losses.append(loss)
    if not math.isfinite(loss):
      smoothed.append(math.inf)
      diverged = True
      break
    average = smoothing * average + (1 - smoothing) * loss
    smoothed.append(average / (1 - smoothing ** (step + 1)))
    if smoothed[-1] > diverge_factor * min(smoothed):
      diverged = True
      break
  smoothed_array = np.array(smoothed)
  lowest = int(np.argmin(smoothed_array))
  best = float(rates[lowest])
  if lowest == 0:
    warnings.warn(
        f'find_learning_rate: the smoothed loss never fell below its first value ({smoothed_array[0]:.4g}) '
        f'between the rates {min_lr:.2g} and {rates[-1]:.2g}, so the suggestion ({best / 10:.2g}) means nothing; '
        'check the model, loss_fn and data, or sweep from a smaller min_lr', RuntimeWarning, stacklevel=2)
  return LRFinderResult(np.array(rates), np.array(losses), smoothed_array, best / 10, diverged)


def plot_lr_finder(result: LRFinderResult, *, ax: Axes | None = None) -> Axes:
  """Plots the loss against the learning rate (log axis), marking the suggestion.

  Args:
    result: from :func:`find_learning_rate`.
    ax: axes to draw on; a new figure when omitted.

  Returns:
    The axes.
  """
  if not isinstance(result, LRFinderResult):
    raise TypeError(f'result: expected an LRFinderResult from find_learning_rate, got {type(result).__name__}')
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 4))
  ax.plot(result.learning_rates, result.losses, lw=1, alpha=0.4, label='loss')
  finite = np.isfinite(result.smoothed)
  ax.plot(result.learning_rates[finite], result.smoothed[finite], label='smoothed loss')
  ax.axvline(result.best_learning_rate, color='gray', ls=':', label=f'lowest: {result.best_learning_rate:.2g}')
  ax.axvline(result.suggestion, color='C3', ls='--', label=f'suggestion: {result.suggestion:.2g}')
  ax.set_xscale('log')
  top = np.nanmax(result.smoothed[finite]) if finite.any() else 1.0
  ax.set_ylim(top=min(top, 2 * result.smoothed[finite][0]) * 1.1 if finite.any() else None)
  ax.set_xlabel('learning rate')
  ax.set_ylabel('training loss')
  ax.legend()
  ax.grid(alpha=0.3)
  return ax
