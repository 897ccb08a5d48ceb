"""Exercises of notebook 03 (optimizers): SGD with momentum and AdamW, one update by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


def _gradients(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  return [{'w': rng.normal(size=(3, 2)).astype(np.float32), 'b': rng.normal(size=2).astype(np.float32)}
          for _ in range(num_steps)]


def _optax_updates(tx, grads):
  params = jax.tree.map(np.zeros_like, grads[0])
  state = tx.init(params)
  updates = []
  for g in grads:
    u, state = tx.update(g, state, params)
    updates.append(jax.tree.map(np.asarray, u))
  return updates


def _leaves(tree, what):
  if not isinstance(tree, dict) or set(tree) != {'w', 'b'}:
    raise Fail(f"{what} should be a dict with the keys 'w' and 'b' like the gradients (use jax.tree.map), "
               f'but it is a {type(tree).__name__}')
  return tree


@exercise('03.1', 'SGD with momentum, one update by hand',
          'a function momentum_step(grads, velocity, learning_rate, momentum) returning (updates, velocity)',
          solutions.momentum_step)
def check_momentum_step(answer):
  lr, mu = 0.1, 0.9
  grads = _gradients(3)
  expected = _optax_updates(optax.sgd(lr, momentum=mu), grads)
  velocity = jax.tree.map(np.zeros_like, grads[0])
  trace = jax.tree.map(np.zeros_like, grads[0])   # optax's velocity: m = g + mu * m
  ema = jax.tree.map(np.zeros_like, grads[0])
  scaled = jax.tree.map(np.zeros_like, grads[0])  # the rate folded in: m = mu * m + lr * g
  for t, g in enumerate(grads):
    result = call(answer, g, velocity, lr, mu)
    if not isinstance(result, tuple) or len(result) != 2:
      raise Fail('momentum_step should return a pair (updates, new_velocity)')
    updates, velocity = _leaves(result[0], 'updates'), _leaves(result[1], 'the new velocity')
    previous = trace
    trace = jax.tree.map(lambda m, g: g + mu * m, trace, g)
    ema = jax.tree.map(lambda m, g: mu * m + (1 - mu) * g, ema, g)
    scaled = jax.tree.map(lambda m, g: mu * m + lr * g, scaled, g)
    for key in ('w', 'b'):
      compare(updates[key], expected[t][key], what=f"updates['{key}']", at=f'at update {t + 1}', rtol=1e-5,
              atol=1e-7, mistakes=[
                  (-expected[t][key], 'the sign is flipped: the update goes against the gradient, '
                                      '-learning_rate * velocity'),
                  (-lr * ema[key], 'that is the averaging form m = mu * m + (1 - mu) * g; optax keeps the plain '
                                   'sum m = g + mu * m (no 1 - mu), so the step is 1 / (1 - mu) times larger'),
                  (-lr * g[key], 'that is plain SGD: the update must use the new velocity, '
                                 'g + momentum * velocity, which carries the earlier gradients'),
              ])
      compare(velocity[key], trace[key], what=f"the new velocity['{key}']", at=f'at update {t + 1}', rtol=1e-5,
              atol=1e-7, mistakes=[
                  (scaled[key], 'the learning rate is folded into the velocity (m = mu * m + lr * g); optax keeps '
                                'm = g + mu * m and multiplies by -learning_rate only in the update'),
                  (previous[key], 'you returned the velocity you were given: return the new one, '
                                  'grads + momentum * velocity, which the next step builds on'),
                  (-lr * trace[key], 'you returned the update as the velocity: the velocity is g + momentum * m, '
                                     'before the multiplication by -learning_rate'),
              ])
  return 'three updates match optax.sgd(0.1, momentum=0.9).'


def _adam_error_hint(error):
  if isinstance(error, ZeroDivisionError):
    return 't counts updates from 1: at t = 0 the bias correction 1 - b1**t is 0'
  return None


def _adam_direction(m, v, t, corrected=True):
  if corrected:
    m, v = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
  return m / (np.sqrt(v) + 1e-8)


@exercise('03.2', 'AdamW, one update by hand: bias correction and decoupled weight decay',
          'a function adamw_step(g, m, v, t, params, learning_rate=1e-3, weight_decay=1e-2, b1=0.9, b2=0.999, '
          'eps=1e-8) returning (update, m, v)', solutions.adamw_step, on_error=_adam_error_hint)
def check_adamw_step(answer):
  rng = np.random.default_rng(3)
  grads = [rng.normal(size=5).astype(np.float32) * s for s in (1.0, 0.5, 2.0)]
  grads[0][0] = 1e-3  # a small gradient: Adam's first step is still about the learning rate
  params = rng.normal(size=5).astype(np.float32)
  lr, wd = 1e-3, 1e-2
  expected = _optax_adamw(params, grads, lr, wd)
  l2 = _optax_adamw(params, [g + wd * params for g in grads], lr, 0.0)
  m = v = np.zeros(5, np.float32)
  m_raw = v_raw = np.zeros(5, np.float64)
  for t, g in enumerate(grads, start=1):
    result = call(answer, jnp.asarray(g), jnp.asarray(m), jnp.asarray(v), t, jnp.asarray(params))
    if not isinstance(result, tuple) or len(result) != 3:
      raise Fail('adamw_step should return three things: (update, m, v)')
    update, m, v = (np.asarray(x) for x in result)
    m_raw = 0.9 * m_raw + 0.1 * np.asarray(g, np.float64)
    v_raw = 0.999 * v_raw + 0.001 * np.asarray(g, np.float64) ** 2
    if not np.all(np.isfinite(update)):
      raise Fail(f'at update t = {t} your update holds NaN or inf: t counts from 1, and the bias corrections '
                 'divide by 1 - b**t')
    at = f'at update t = {t}'
    compare(update, expected[t - 1], what='your update', at=at, rtol=1e-4, atol=1e-9, mistakes=[
        (-lr * (_adam_direction(m_raw, v_raw, t, corrected=False) + wd * params),
         'the bias correction is missing: divide m by 1 - b1**t and v by 1 - b2**t'),
        (-lr * _adam_direction(m_raw, v_raw, t), 'the weight decay is missing: add weight_decay * params to the '
                                                 'Adam direction, then multiply by -learning_rate'),
        (-lr * _adam_direction(m_raw, v_raw, t) - wd * params,
         'the decay should be multiplied by the learning rate too: -learning_rate * (adam + weight_decay * params)'),
        (l2[t - 1], 'that is Adam with an L2 term (weight_decay * params added to the gradient, so it passes '
                    'through m and v); AdamW adds it to the update, after the division by sqrt(v_hat)'),
        (-expected[t - 1], 'the sign is flipped: the update is -learning_rate * (...)'),
    ])
    if t == 1 and not np.allclose(m, m_raw, rtol=1e-5, atol=1e-9) and np.allclose(
        m, 0.9 * 0 + 0.1 * (g + wd * params), rtol=1e-5):
      raise Fail('m should average the gradient alone; in AdamW the weight decay never enters m or v')
    compare(m, m_raw, what='the returned m', at=at, rtol=1e-5, atol=1e-9, mistakes=[
        (m_raw / (1 - 0.9 ** t), 'you returned the bias-corrected m_hat: return the raw moving average m, '
                                 'the correction is applied afresh at every step')])
    compare(v, v_raw, what='the returned v', at=at, rtol=1e-5, atol=1e-12, mistakes=[
        (v_raw / (1 - 0.999 ** t), 'you returned the bias-corrected v_hat: return the raw moving average v')])
  return 'three updates match optax.adamw(1e-3, weight_decay=1e-2), bias correction and decay included.'


def _optax_adamw(params, grads, lr, wd):
  tx = optax.adamw(lr, weight_decay=wd)
  state = tx.init(params)
  updates = []
  for g in grads:
    u, state = tx.update(g, state, params)
    updates.append(np.asarray(u))
  return updates
