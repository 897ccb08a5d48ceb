"""Learning-rate schedules: validated builders that return optax schedules.

A schedule is a plain function ``step -> learning rate``; pass it to any optax
optimizer as ``learning_rate``. The builders here add nothing to the maths:
each one checks its arguments on the host, before anything is built, and then
returns the optax schedule. They exist because optax accepts, without a word,
inputs that are almost always mistakes (a warmup longer than the whole run, a
negative rate, ``alpha`` read as a final rate) or fails later with a message
that does not name the argument a user passed.

Step convention: the update numbered ``t`` (counting from 0, the value of
``optimizer.step`` before the update) uses ``schedule(t)``, because optax
evaluates the schedule at its own update count, which starts at 0. So a run of
``total_steps`` updates uses ``schedule(0) .. schedule(total_steps - 1)``.

Introduced in notebook 04 (learning-rate schedules).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optax

from flaxtrain import checks

__all__ = ['constant_schedule', 'warmup_cosine', 'exponential_decay']


def _check_rate(name: str, value: Any) -> float:
  """A learning rate: a finite number >= 0."""
  return checks.check_real(name, value, expected='a finite learning rate >= 0', valid=lambda v: v >= 0)


def constant_schedule(value: float) -> optax.Schedule:
  """The same learning rate at every step.

  Args:
    value: the learning rate, finite and >= 0.

  Returns:
    An optax schedule, ``step -> value``.

  Raises:
    ValueError: if ``value`` is negative or not finite.

  Example:
    >>> schedule = constant_schedule(1e-3)
    >>> float(schedule(500))
    0.001
  """
  return optax.constant_schedule(_check_rate('value', value))


def warmup_cosine(
    peak_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    *,
    init_value: float = 0.0,
    alpha: float = 0.0,
) -> optax.Schedule:
  r"""Linear warmup from ``init_value`` to ``peak_value``, then cosine decay.

  With :math:`p` the peak, :math:`W` the warmup steps and :math:`T` the total:

  * :math:`t < W`: ``init_value + (p - init_value) * t / W``;
  * :math:`W \le t \le T`: :math:`p\,(\alpha + (1 - \alpha)\,\tfrac12(1 + \cos(\pi\,\tfrac{t - W}{T - W})))`;
  * :math:`t > T`: :math:`\alpha p`.

  ``total_steps`` counts the warmup, as ``decay_steps`` does in
  ``optax.warmup_cosine_decay_schedule``. ``alpha`` is a *multiplier* of the
  peak, as in ``optax.cosine_decay_schedule``: the final rate is
  ``alpha * peak_value``, not ``alpha``. With ``warmup_steps == total_steps``
  there is no decay phase and the rate is ``alpha * peak_value`` from step
  ``total_steps`` on.

  Args:
    peak_value: the rate reached at the end of the warmup, finite and >= 0.
    total_steps: length of the whole schedule, warmup included; a positive int.
    warmup_steps: length of the linear warmup, an int in ``[0, total_steps]``.
    init_value: the rate at step 0, finite and >= 0.
    alpha: final rate as a fraction of ``peak_value``, in ``[0, 1]``.

  Returns:
    An optax schedule, ``step -> learning rate``.

  Raises:
    ValueError: for a negative or non-finite rate, a non-positive
      ``total_steps``, a ``warmup_steps`` outside ``[0, total_steps]``, or an
      ``alpha`` outside ``[0, 1]``.

  Example:
    >>> schedule = warmup_cosine(1e-3, total_steps=1000, warmup_steps=100, alpha=0.1)
    >>> [round(float(schedule(t)), 6) for t in (0, 50, 100, 1000)]
    [0.0, 0.0005, 0.001, 0.0001]
  """
  peak_value = _check_rate('peak_value', peak_value)
  init_value = _check_rate('init_value', init_value)
  total_steps = checks.check_int('total_steps', total_steps, minimum=1)
  warmup_steps = checks.check_int('warmup_steps', warmup_steps, minimum=0)
  if warmup_steps > total_steps:
    raise ValueError(
        f'warmup_steps: expected at most total_steps ({total_steps}), the length of the whole '
        f'schedule including warmup, got {warmup_steps}'
    )
  alpha = checks.check_real(
      'alpha', alpha, expected='a multiplier of peak_value in [0, 1]', valid=lambda v: 0.0 <= v <= 1.0
  )

  if warmup_steps == total_steps:  # a decay phase of length 0 is already at its end
    decay = optax.constant_schedule(alpha * peak_value)
  else:
    decay = optax.cosine_decay_schedule(peak_value, total_steps - warmup_steps, alpha=alpha)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(init_value, peak_value, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    *,
    staircase: bool,
    transition_begin: int = 0,
    end_value: float | None = None,
) -> optax.Schedule:
  r"""Exponential decay; ``staircase`` must be chosen explicitly.

  With :math:`s = \max(t - \text{transition\_begin}, 0)`, the rate at step
  :math:`t` is ``init_value * decay_rate ** (s / transition_steps)``. With
  ``staircase=False`` the exponent is continuous, so the rate shrinks a little
  at every step and is multiplied by exactly ``decay_rate`` every
  ``transition_steps`` steps; with ``staircase=True`` the exponent is
  ``floor(s / transition_steps)``, so the rate stays flat and drops by
  ``decay_rate`` at once every ``transition_steps`` steps. optax defaults to
  the continuous form, which is easily mistaken for the staircase, hence no
  default here.

  Args:
    init_value: the rate at step 0, finite and >= 0.
    transition_steps: steps over which the rate is multiplied by
      ``decay_rate``; a positive int.
    decay_rate: factor per ``transition_steps``, in ``(0, 1]``.
    staircase: True for discrete drops, False for a smooth decay.
    transition_begin: steps to hold ``init_value`` before decaying, an int >= 0.
    end_value: optional floor, finite, in ``[0, init_value]``.

  Returns:
    An optax schedule, ``step -> learning rate``.

  Raises:
    ValueError: for any argument outside the ranges above.

  Example:
    >>> schedule = exponential_decay(1.0, 10, 0.5, staircase=True)
    >>> [float(schedule(t)) for t in (0, 9, 10, 25)]
    [1.0, 1.0, 0.5, 0.25]
  """
  init_value = _check_rate('init_value', init_value)
  transition_steps = checks.check_int('transition_steps', transition_steps, minimum=1)
  decay_rate = checks.check_real(
      'decay_rate', decay_rate, expected='a factor in (0, 1]', valid=lambda v: 0.0 < v <= 1.0
  )
  if not isinstance(staircase, (bool, np.bool_)):
    raise ValueError(f'staircase: expected True or False, got {staircase!r}')
  transition_begin = checks.check_int('transition_begin', transition_begin, minimum=0)
  if end_value is not None:
    end_value = _check_rate('end_value', end_value)
    if end_value > init_value:
      raise ValueError(
          f'end_value: expected a floor at most init_value ({init_value}), got {end_value!r}'
      )
  return optax.exponential_decay(
      init_value, transition_steps, decay_rate,
      transition_begin=transition_begin, staircase=bool(staircase), end_value=end_value,
  )
