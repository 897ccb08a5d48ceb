"""Exercises of notebook 09 (fast training loops): stacking batches, many steps in one jax.lax.scan."""

from __future__ import annotations

import re

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
  if isinstance(got, (list, tuple)):
    raise Fail(f'stack returned a {type(got).__name__} of {len(got)}, not one dict: jax.tree.map(f, batches) maps '
               'over every leaf of the list on its own. Pass the K batches as K trees, so that f receives the K '
               'arrays of each key together: jax.tree.map(lambda *arrays: np.stack(arrays), *batches)')
  if not isinstance(got, dict) or set(got) != {'image', 'label'}:
    raise Fail(f"stack should return a dict with the same keys as a batch ('image', 'label'), got "
               f'{type(got).__name__}')
  expected = solutions.stack(batches)
  for key in ('image', 'label'):
    concatenated = np.concatenate([b[key] for b in batches])
    compare(got[key], expected[key], what=f"your stacked '{key}'", at='for 3 batches of 4', mistakes=[
        (concatenated, f'np.concatenate joins the batches into one long batch of shape {concatenated.shape}; '
                       f'np.stack adds a new leading axis: shape {expected[key].shape}, one row per step'),
        (np.stack([b[key] for b in batches], axis=1),
         f'the new axis is the second one (shape {np.stack([b[key] for b in batches], axis=1).shape}); the steps '
         f'must be the LEADING axis, shape {expected[key].shape}: np.stack(arrays) (axis=0)'),
        (np.stack([b[key] for b in batches], axis=-1),
         'the new axis is the last one; the steps must be the LEADING axis: np.stack(arrays) (axis=0)'),
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


def _has_scan(jaxpr) -> bool:
  """Whether the printed jaxpr, nested jaxprs included, holds a ``scan`` (jax.lax.scan, or a fixed-range fori_loop)."""
  return re.search(r'\bscan\[', str(jaxpr)) is not None


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
  if np.shape(params) == np.shape(reference_losses) and np.shape(losses) == np.shape(reference_params) \
      and np.allclose(np.asarray(params), reference_losses, rtol=1e-5):
    raise Fail('the pair is swapped: jax.lax.scan returns (final carry, stacked outputs), here (params, losses)')
  losses_array = np.asarray(jax.device_get(losses)) if not isinstance(losses, list) else np.asarray(losses)
  side_by_side = np.asarray(jax.vmap(lambda batch: _linear_step([])(w0, batch)[1])(stacked))
  compare(losses_array, reference_losses, what='your losses', at='for 5 steps of a linear model', rtol=1e-5,
          mistakes=[(reference_losses[-1], 'return the loss of every step (shape (K,)), not only the last'),
                    (reference_losses[0], 'return the loss of every step (shape (K,)), not only the first'),
                    (side_by_side, 'every step started from the initial params (as jax.vmap over the batches '
                                   'does): a step must start from the params the previous step returned, which '
                                   'jax.lax.scan carries from one step to the next')],
          index_names=('step',))
  compare(params, reference_params, what='your final params', at='after 5 steps', rtol=1e-5)
  if len(calls) > 1:
    raise Fail(f'the results are right, but `step` ran {len(calls)} times in Python: a Python loop unrolls the '
               'K steps into the program. Use jax.lax.scan(step, params, stacked), which traces `step` once')
  try:
    jaxpr = jax.make_jaxpr(lambda p, s: answer(_linear_step([]), p, s))(w0, stacked)
  except Exception as error:  # the learner's code, traced
    raise Fail(f'the results are right, but run_steps cannot be traced by JAX ({type(error).__name__}: '
               f'{str(error).splitlines()[0] if str(error) else ""}); built on jax.lax.scan, the whole loop is one '
               'traceable function') from error
  if not _has_scan(jaxpr):
    raise Fail('the results are right, but there is no scan in your function: traced with jax.make_jaxpr it runs '
               'the step once per batch (a Python loop, here over a step that is jitted or traced only once). '
               'Use jax.lax.scan(step, params, stacked): one loop in the compiled program, one dispatch for K steps')
  return 'one traced step in a jax.lax.scan over 5 batches: same losses and weights as 5 separate steps.'
