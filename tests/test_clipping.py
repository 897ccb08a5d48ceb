"""The train step reports the gradient norm *before* the optimizer clips it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft


class Linear(nnx.Module):
  """Loss = <w, target> + <b, target_b>: the gradient is the batch's target, exactly."""

  def __init__(self):
    self.w = nnx.Param(jnp.zeros((3, 2)))
    self.b = nnx.Param(jnp.zeros((2,)))


def linear_loss(model, batch):
  loss = jnp.sum(model.w[...] * batch['gw']) + jnp.sum(model.b[...] * batch['gb'])
  return loss, {}


GRADS = {
    'gw': jnp.array([[3.0, -4.0], [0.0, 12.0], [-1.0, 2.0]], jnp.float32),
    'gb': jnp.array([5.0, -0.5], jnp.float32),
}
RAW_NORM = float(np.sqrt(sum(np.sum(np.square(g)) for g in GRADS.values())))  # about 14.25


def _params(model):
  return np.concatenate([np.ravel(model.w[...]), np.ravel(model.b[...])])


def _raw():
  return np.concatenate([np.ravel(GRADS['gw']), np.ravel(GRADS['gb'])])


@pytest.mark.parametrize('max_norm', [1.0, 5.0, 100.0], ids=['clips_hard', 'clips', 'no_clip'])
def test_grad_norm_is_the_raw_norm_and_the_update_is_clipped(max_norm):
  learning_rate = 0.1
  model = Linear()
  tx = optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(learning_rate))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = ft.make_train_step(linear_loss)(model, optimizer, GRADS)

  np.testing.assert_allclose(float(metrics['grad_norm']), RAW_NORM, rtol=1e-6)
  scale = min(1.0, max_norm / RAW_NORM)
  step = -_params(model) / learning_rate  # the update that was applied, divided by the rate
  np.testing.assert_allclose(step, scale * _raw(), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(step), min(max_norm, RAW_NORM), rtol=1e-5)


def test_grad_norm_is_not_the_clipped_norm():
  model = Linear()
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), wrt=nnx.Param)
  metrics = ft.make_train_step(linear_loss)(model, optimizer, GRADS)
  assert float(metrics['grad_norm']) > 10.0  # raw: 14.25; clipped would be 1.0
  assert np.linalg.norm(_params(model)) == pytest.approx(1.0, rel=1e-5)


def test_grad_norm_before_value_clipping():
  model = Linear()
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip(2.0), optax.sgd(1.0)), wrt=nnx.Param)
  metrics = ft.make_train_step(linear_loss)(model, optimizer, GRADS)
  np.testing.assert_allclose(float(metrics['grad_norm']), RAW_NORM, rtol=1e-6)
  np.testing.assert_allclose(-_params(model), np.clip(_raw(), -2.0, 2.0), rtol=1e-6)


def test_grad_norm_matches_optax_tree_norm_on_a_real_model():
  splits = ft.load_digits(seed=0)
  batch = {k: v[:32] for k, v in splits.train.items()}
  model = ft.MLP(64, (32, 32), 10, rngs=nnx.Rngs(0))
  grads = nnx.grad(lambda m: ft.classification_loss(m, batch)[0])(model)
  expected = float(optax.tree.norm(grads))
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(expected / 10), optax.adam(1e-3)), wrt=nnx.Param)
  metrics = jax.device_get(ft.make_train_step()(model, optimizer, batch))
  np.testing.assert_allclose(metrics['grad_norm'], expected, rtol=1e-5)
  assert expected / 10 < 0.5 * metrics['grad_norm']  # the clipped norm would have been reported as ~expected / 10


def test_learning_rate_is_found_behind_a_clip_in_a_chain():
  schedule = optax.linear_schedule(0.0, 1.0, 4)
  model = Linear()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.sgd)(learning_rate=schedule))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train_step = ft.make_train_step(linear_loss)
  rates, norms = [], []
  for _ in range(6):
    before = np.linalg.norm(_params(model))
    metrics = train_step(model, optimizer, GRADS)
    rates.append(float(metrics['learning_rate']))
    norms.append(np.linalg.norm(_params(model)) - before)  # all updates point the same way
  np.testing.assert_allclose(rates, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-7)
  np.testing.assert_allclose(norms, rates, atol=1e-5)  # clipped to norm 1, scaled by the rate
