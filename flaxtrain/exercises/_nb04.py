"""Exercises of notebook 04 (learning-rate schedules): warmup-stable-decay, inverse square root."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, LearnerError, call, compare, exercise


def _rates(schedule, steps):
  """``schedule`` at int32 ``steps``, traced by jax.vmap as an optimizer would trace it."""
  try:
    return np.asarray(jax.vmap(schedule)(jnp.asarray(steps, jnp.int32)), np.float64)
  except NotImplementedError:
    raise
  except Exception as error:
    raise LearnerError(error) from error


def _check_schedule(schedule, expected_schedule, steps, describe, mistakes_for):
  if not callable(schedule):
    raise Fail(f'your function should return a schedule (a function of the step), but it returned a '
               f'{type(schedule).__name__}')
  got = _rates(schedule, steps)
  expected = _rates(expected_schedule, steps)
  if got.shape != expected.shape:
    raise Fail(f'your schedule should return one rate per step (a scalar), but it returned shape {got.shape[1:]}')
  bad = ~np.isclose(got, expected, rtol=1e-5, atol=1e-9)
  if not bad.any():
    return
  first = int(np.argmax(bad))
  for wrong, hint in mistakes_for():
    if np.allclose(got, _rates(wrong, steps), rtol=1e-5, atol=1e-9):
      raise Fail(f'at step {steps[first]} ({describe(steps[first])}) your schedule gives {got[first]:.5g}, but it '
                 f'should give {expected[first]:.5g}: {hint}')
  compare(got[first], expected[first], what='your schedule', at=f'at step {steps[first]} ({describe(steps[first])})',
          rtol=1e-5, atol=1e-9)


def _wsd_mistakes(peak, warmup, stable, decay):
  return [
      (optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
                             optax.linear_schedule(peak, 0.0, decay)], [warmup, stable]),
       'the boundaries are step numbers counted from 0, not phase lengths: the decay starts at '
       'warmup_steps + stable_steps'),
      (optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
                             optax.linear_schedule(peak, 0.0, decay, transition_begin=warmup + stable)],
                            [warmup, warmup + stable]),
       'join_schedules already hands each schedule the steps counted from its boundary, so the decay must '
       'not wait again with transition_begin'),
      (optax.join_schedules([optax.linear_schedule(0.0, peak, warmup - 1), optax.constant_schedule(peak),
                             optax.linear_schedule(peak, 0.0, decay)], [warmup, warmup + stable]),
       'the warmup reaches the peak one step early: transition_steps is warmup_steps'),
      (optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
                             optax.linear_schedule(peak, 0.0, decay)], [warmup + 1, warmup + stable + 1]),
       'each boundary is one step late: the first step of the next phase is step warmup_steps (counting from 0)'),
  ]


@exercise('04.1', 'warmup, hold, linear decay, joined with optax.join_schedules',
          'a function warmup_stable_decay(peak, warmup_steps, stable_steps, decay_steps) returning a schedule',
          solutions.warmup_stable_decay)
def check_warmup_stable_decay(answer):
  for peak, warmup, stable, decay in ((1e-3, 100, 200, 100), (0.5, 5, 7, 11)):
    schedule = call(answer, peak, warmup, stable, decay)
    ends = (warmup, warmup + stable, warmup + stable + decay)
    steps = sorted({0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, warmup + stable // 2, ends[1] - 1, ends[1],
                    ends[1] + 1, ends[1] + decay // 2, ends[2] - 1, ends[2], ends[2] + 10})

    def describe(step):
      if step < warmup:
        return 'warmup'
      if step < ends[1]:
        return 'hold at the peak'
      return 'decay' if step < ends[2] else 'after the decay'
    _check_schedule(schedule, solutions.warmup_stable_decay(peak, warmup, stable, decay), steps,
                    lambda s: f'{describe(s)}; peak {peak:g}, warmup {warmup}, hold {stable}, decay {decay}',
                    lambda: _wsd_mistakes(peak, warmup, stable, decay))
  return 'warmup, hold and decay switch at the right steps, for two settings.'


def _tracer_hint(error):
  if 'Tracer' in type(error).__name__ or 'concrete' in str(error).lower():
    return ('an optimizer calls the schedule inside jax.jit (this check inside jax.vmap), where `step` is a traced '
            'array: a Python `if step < ...` cannot look at its value. Compute both branches and pick with '
            'jnp.where (or use jnp.minimum)')
  return None


@exercise('04.2', 'an inverse-square-root schedule that works under jax.jit',
          'a function inverse_sqrt(peak, warmup_steps) returning a schedule', solutions.inverse_sqrt,
          on_error=_tracer_hint)
def check_inverse_sqrt(answer):
  for peak, warmup in ((1e-3, 100), (2.0, 7)):
    schedule = call(answer, peak, warmup)
    steps = sorted({0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, 4 * warmup, 100 * warmup})

    def mistakes():
      return [
          (lambda s: jnp.where(s < warmup, peak * (s // warmup), peak * jnp.sqrt(warmup / jnp.maximum(s, 1.0))),
           'integer division: step // warmup_steps is 0 throughout the warmup; use true division, '
           'step / warmup_steps'),
          (lambda s: peak * jnp.sqrt(warmup / jnp.maximum(s, 1.0)),
           'the warmup is missing: below warmup_steps the rate should rise linearly from 0'),
          (lambda s: jnp.where(s < warmup, peak * s / warmup, peak / jnp.sqrt(jnp.maximum(s, 1.0))),
           'after the warmup the rate should be peak * sqrt(warmup_steps / step), which equals the peak at '
           'step = warmup_steps; peak / sqrt(step) drops at the boundary'),
      ]
    _check_schedule(schedule, solutions.inverse_sqrt(peak, warmup), steps,
                    lambda s: f'peak {peak:g}, warmup {warmup}', mistakes)
  return 'linear warmup, then peak * sqrt(warmup_steps / step), under jax.jit.'
