"""Plots of training curves and learning-rate schedules.

Each function takes data and an optional matplotlib ``ax``, draws on it and
returns it; none of them changes global matplotlib settings.

In a notebook, a cell whose last line is such a call also prints the returned
``Axes`` (``<Axes: xlabel='step', ...>``) under the plot, as Jupyter does for
any value. Assign it (``ax = ft.plot_history(history)``), end the line with
``;``, or end the cell with ``plt.show()`` to show the plot alone.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import pyplot as plt
from matplotlib.axes import Axes

from flaxtrain import checks
from flaxtrain.history import History

__all__ = ['plot_history', 'plot_schedule']


def _axes(ax: Axes | None) -> Axes:
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 4))
  return ax


def plot_history(
    history: History, metric: str = 'loss', *, ax: Axes | None = None, log_scale: bool = False
) -> Axes:
  """Plots ``metric`` for training and validation against the step on one axes.

  Draws, when recorded: the per-step training values (thin line), the
  per-epoch ``train_<metric>`` and ``val_<metric>`` (markers, at the step
  where each epoch ended).

  Args:
    history: a :class:`flaxtrain.History`.
    metric: e.g. ``'loss'`` or ``'accuracy'``.
    ax: axes to draw on; a new figure when omitted.
    log_scale: logarithmic y axis (useful for losses).

  Returns:
    The axes, to draw more on it. In a notebook, assign it (or end the line
    with ``;``) so that its repr is not printed under the plot.

  Raises:
    TypeError: if ``history`` is not a History (a dict such as
      ``history.steps()`` or ``state_dict()`` is refused, naming the fix).
    ValueError: if nothing named ``metric`` was recorded.

  Example:
    >>> ax = ft.plot_history(history, 'loss', log_scale=True)  # doctest: +SKIP
    >>> ax = ft.plot_history(history, 'accuracy')              # doctest: +SKIP
  """
  if not isinstance(history, History):
    fix = (' (it looks like History.steps(), epochs() or state_dict(); pass the History itself, or '
           'History.from_state_dict(state) for a state_dict)') if isinstance(history, dict) else ''
    raise TypeError(f'history: expected a flaxtrain.History, got {type(history).__name__}{fix}')
  steps, epochs = history.steps(), history.epochs()
  series = []
  if metric in steps:
    series.append((steps['step'], steps[metric], dict(lw=1, alpha=0.5, label=f'train {metric} (step)')))
  for split in ('train', 'val'):
    name = f'{split}_{metric}'
    if name in epochs:
      series.append((epochs['step'], epochs[name], dict(marker='o', label=f'{split} {metric} (epoch)')))
  if not series:
    recorded = sorted((set(steps) | set(epochs)) - {'step', 'epoch'})
    raise ValueError(f'metric: expected one of the recorded metrics {recorded}, got {metric!r}')
  ax = _axes(ax)
  for x, y, style in series:
    ax.plot(x, y, **style)
  ax.set_xlabel('step')
  ax.set_ylabel(metric)
  if log_scale:
    ax.set_yscale('log')
  ax.legend()
  ax.grid(alpha=0.3)
  return ax


def plot_schedule(
    schedule: Callable[[jax.Array], jax.Array],
    num_steps: int,
    *,
    ax: Axes | None = None,
    label: str | None = None,
    **plot_kwargs,
) -> Axes:
  """Plots any optax schedule (``step -> learning rate``) over ``num_steps``.

  Steps ``0 .. num_steps - 1`` are drawn: the rates that ``num_steps``
  updates use, since optax evaluates the schedule at its update count, which
  starts at 0. The schedule is evaluated for all steps at once with
  ``jax.vmap``, on int32 steps as optax passes them.

  Args:
    schedule: e.g. ``optax.warmup_cosine_decay_schedule(...)`` or a
      :mod:`flaxtrain.schedules` builder's result.
    num_steps: a positive int, the number of steps drawn.
    ax: axes to draw on; a new figure when omitted.
    label: legend label.
    **plot_kwargs: passed to ``ax.plot``.

  Returns:
    The axes.

  Raises:
    TypeError: if ``schedule`` is not callable.
    ValueError: if ``num_steps`` is not a positive int, or ``schedule``
      does not return one finite scalar per step (the message names the
      first step with a NaN or infinite rate).

  Example:
    >>> ax = plot_schedule(optax.cosine_decay_schedule(1e-3, 100), 100, label='cosine')
  """
  if not callable(schedule):
    raise TypeError(f'schedule: expected a callable step -> learning rate, got {schedule!r}')
  checks.check_int('num_steps', num_steps)
  steps = np.arange(num_steps)
  values = np.asarray(jax.vmap(schedule)(jnp.asarray(steps, dtype=jnp.int32)), dtype=np.float64)
  if values.shape != (num_steps,):
    raise ValueError(
        f'schedule: expected a scalar learning rate for each step, got shape {values.shape[1:]} per step'
    )
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise ValueError(
        f'schedule: expected a finite learning rate at every step, got {values[bad[0]]} at step '
        f'{bad[0]} ({bad.size} of {num_steps} steps are NaN or infinite)'
    )
  ax = _axes(ax)
  ax.plot(steps, values, label=label, **plot_kwargs)
  ax.set_xlabel('step')
  ax.set_ylabel('learning rate')
  if label is not None:
    ax.legend()
  ax.grid(alpha=0.3)
  return ax
