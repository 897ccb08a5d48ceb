"""Exercises of notebook 02 (gradients and the train step): a gradient by hand, a train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flaxtrain as ft
from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


def _batch(seed, size=16):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(size, 8, 8, 1)).astype(np.float32),
          'label': rng.integers(0, 10, size=size).astype(np.int32)}


def _aux_hint(error):
  text = str(error)
  if 'scalar-output' in text or 'has_aux' in text:
    return ('the function you differentiate returns (loss, aux): pass has_aux=True to nnx.value_and_grad, '
            'and unpack its result as (loss, aux), grads')
  if isinstance(error, TypeError) and 'update' in text and 'grads' in text:
    return 'optimizer.update takes the model and the gradients: optimizer.update(model, grads)'
  return None


def _least_squares(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(20, 3)).astype(np.float32)
  y = rng.normal(size=20).astype(np.float32)
  params = {'w': np.array([0.5, -1.0, 2.0], np.float32), 'b': np.float32(0.3)}
  return params, x, y


@exercise('02.1', 'the gradient of a least-squares loss, by hand',
          "a function mse_grads(params, x, y) returning {'w': ..., 'b': ...}", solutions.mse_grads)
def check_mse_grads(answer):
  for seed in (0, 1):
    params, x, y = _least_squares(seed)
    got = call(answer, params, x, y)
    if not isinstance(got, dict) or set(got) != {'w', 'b'}:
      raise Fail(f"mse_grads should return a dict with the keys 'w' and 'b' (the same structure as params), got "
                 f'{type(got).__name__}{" with keys " + str(sorted(got)) if isinstance(got, dict) else ""}')
    expected = jax.grad(lambda p: jnp.mean((x @ p['w'] + p['b'] - y) ** 2))(params)
    without_b = jax.tree.map(np.asarray, jax.grad(lambda p: jnp.mean((x @ p['w'] - y) ** 2))(params))
    at = f'for 20 examples of 3 features (seed {seed})'
    for key in ('w', 'b'):
      e = np.asarray(expected[key])
      compare(got[key], e, what=f"your gradient['{key}']", at=at, rtol=1e-4, atol=1e-6, mistakes=[
          (e / 2, 'half the right value: the derivative of r ** 2 is 2 * r'),
          (e * len(y), 'too large by the number of examples: the loss is a mean, so divide by len(y)'),
          (e * len(y) / 2, 'that is the gradient of half the SUM of squares: the loss is the mean of r ** 2'),
          (-e, 'the sign is flipped: the residual is prediction - target, x @ w + b - y'),
          (without_b[key], 'b is missing from the residual: the prediction is x @ w + b, so the residual is '
                           'x @ w + b - y'),
      ])
  return "matches jax.grad for both 'w' and 'b'."


@exercise('02.2', 'a train step with nnx.value_and_grad(..., has_aux=True)',
          'a function train_step(model, optimizer, batch) returning a dict with "loss" and "accuracy"',
          solutions.train_step, on_error=_aux_hint)
def check_train_step(answer):
  batches = [_batch(1), _batch(2)]
  traces = []

  class CountedMLP(ft.MLP):
    """ft.MLP that counts how often Python runs its forward pass: once per trace under nnx.jit."""

    def __call__(self, x, *args, **kwargs):
      traces.append(1)
      return super().__call__(x, *args, **kwargs)

  model = CountedMLP(64, (32,), 10, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  reference = ft.MLP(64, (32,), 10, rngs=nnx.Rngs(0))
  reference_optimizer = nnx.Optimizer(reference, optax.sgd(0.1), wrt=nnx.Param)
  start = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  runs = []
  for i, batch in enumerate(batches):
    expected = solutions.train_step(reference, reference_optimizer, batch)
    got = call(answer, model, optimizer, batch)
    runs.append(len(traces))
    if not isinstance(got, dict) or not {'loss', 'accuracy'} <= set(got):
      raise Fail(f"train_step should return a dict with the keys 'loss' and 'accuracy', but it returned "
                 f'{type(got).__name__}{" with keys " + str(sorted(got)) if isinstance(got, dict) else ""}')
    try:
      compare(got['loss'], expected['loss'], what="the returned 'loss'", at=f'at step {i}', rtol=1e-5)
    except Fail as failure:
      raise Fail(f'{failure}. Compute it from the `model` and `batch` passed in, not from variables outside the '
                 'function (a batch or model captured from the notebook is the closure bug of section 4)') from None
    compare(got['accuracy'], expected['accuracy'], what="the returned 'accuracy'", at=f'at step {i}', rtol=1e-6)
    now = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    if i == 0 and all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(now))):
      raise Fail('the weights did not change: after computing the gradients, call optimizer.update(model, grads) '
                 'on the model and optimizer passed in (with jax.jit instead of nnx.jit the update would only '
                 'change copies)')
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(now),
                            jax.tree.leaves(nnx.state(reference, nnx.Param))):
      compare(a, b, what=f'the weights {jax.tree_util.keystr(path)}', at=f'after step {i}', rtol=1e-4, atol=1e-6)
  if runs[1] > runs[0]:
    raise Fail(f'the results are right, but the step is not compiled: Python ran the model again at the second '
               f'call ({runs[0]} time(s) at the first, {runs[1] - runs[0]} more at the second, same shapes). '
               'Decorate train_step with @nnx.jit: it is traced once, and every later call with batches of the same '
               'shape runs the compiled step')
  return ('a jitted step (traced once for two batches) that returns the loss and accuracy of the batch it is given '
          'and updates the weights as SGD should.')
