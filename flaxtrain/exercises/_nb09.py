"""Exercises of notebook 09 (fast training loops): stacking batches, many steps in one jax.lax.scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


def _batches(k=3, size=4):
  rng = np.random.default_rng(0)
  return [{'image': rng.normal(size=(size, 8, 8, 1)).astype(np.float32),
           'label': rng.integers(0, 10, size=size).astype(np.int32)} for _ in range(k)]


@exercise('09.1', 'stack K batches into one batch with a leading axis of K',
          'a function stack(batches) returning a dict of arrays', solutions.stack)
def check_stack(answer):
  batches = _batches()
  got = call(answer, batches)
  if not isinstance(got, dict) or set(got) != {'image', 'label'}:
    raise Fail(f"stack should return a dict with the same keys as a batch ('image', 'label'), got "
               f'{type(got).__name__}')
  expected = solutions.stack(batches)
  for key in ('image', 'label'):
    concatenated = np.concatenate([b[key] for b in batches])
    compare(got[key], expected[key], what=f"your stacked '{key}'", at='for 3 batches of 4', mistakes=[
        (concatenated, f'np.concatenate joins the batches into one long batch of shape {concatenated.shape}; '
                       f'np.stack adds a new leading axis: shape {expected[key].shape}, one row per step'),
    ], index_names=('batch', 'example'))
    if np.asarray(got[key]).dtype != expected[key].dtype:
      raise Fail(f"your stacked '{key}' has dtype {np.asarray(got[key]).dtype}; it should keep "
                 f'{expected[key].dtype}')
  return 'a dict of arrays of shape (K, batch, ...), one slice per step.'


def _linear_step(calls):
  def step(w, batch):
    calls.append(1)
    x, y = batch['x'], batch['y']
    loss, grad = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
    return w - 0.1 * grad, loss
  return step


def _stacked(k=5):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(k, 8, 3)).astype(np.float32)
  return {'x': x, 'y': (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)}


@exercise('09.2', 'K train steps in one jax.lax.scan',
          'a function run_steps(step, params, stacked) returning (params, losses)', solutions.run_steps)
def check_run_steps(answer):
  stacked = _stacked()
  w0 = jnp.zeros(3, jnp.float32)
  reference_params, reference_losses = solutions.run_steps(_linear_step([]), w0, stacked)
  calls = []
  result = call(answer, _linear_step(calls), w0, stacked)
  if not isinstance(result, tuple) or len(result) != 2:
    raise Fail('run_steps should return a pair (final params, losses), as jax.lax.scan does')
  params, losses = result
  losses_array = np.asarray(jax.device_get(losses)) if not isinstance(losses, list) else np.asarray(losses)
  compare(losses_array, reference_losses, what='your losses', at='for 5 steps of a linear model', rtol=1e-5,
          mistakes=[(reference_losses[-1], 'return the loss of every step (shape (K,)), not only the last'),
                    (reference_losses[0], 'return the loss of every step (shape (K,)), not only the first')],
          index_names=('step',))
  compare(params, reference_params, what='your final params', at='after 5 steps', rtol=1e-5)
  if len(calls) > 1:
    raise Fail(f'the results are right, but `step` ran {len(calls)} times in Python: a Python loop unrolls the '
               'K steps into the program. Use jax.lax.scan(step, params, stacked), which traces `step` once')
  return 'one traced step, scanned over 5 batches: same losses and weights as 5 separate steps.'
