"""make_optimizer: same updates as the hand-built optax chain, readable rate, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft


def make_params():
  rng = np.random.default_rng(0)
  return {
      'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
      'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32),
  }


def make_grads(step, scale=1.0):
  rng = np.random.default_rng(100 + step)
  return {
      'w': jnp.asarray(scale * rng.normal(size=(4, 3)), jnp.float32),
      'b': jnp.asarray(scale * rng.normal(size=(3,)), jnp.float32),
  }


def assert_trees_close(actual, desired, **tolerances):
  assert jax.tree.structure(actual) == jax.tree.structure(desired)
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
    np.testing.assert_allclose(a, d, **tolerances)


def run(tx, num_steps=5, grad_scale=1.0):
  """Applies ``tx`` for ``num_steps`` under jax.jit; returns params and state."""
  params = make_params()
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(num_steps):
    params, state = step(params, state, make_grads(i, grad_scale))
  return params, state


SCHEDULE = optax.linear_schedule(0.1, 0.01, transition_steps=4)

# (case name, make_optimizer arguments, the equivalent optax chain without clipping)
CASES = [
    ('sgd', dict(name='sgd', learning_rate=0.1), lambda: optax.sgd(0.1)),
    ('sgd_momentum', dict(name='sgd', learning_rate=0.1, momentum=0.9),
     lambda: optax.sgd(0.1, momentum=0.9)),
    ('sgd_weight_decay', dict(name='sgd', learning_rate=0.1, momentum=0.5, weight_decay=0.01),
     lambda: optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.5))),
    ('adam', dict(name='adam', learning_rate=1e-2), lambda: optax.adam(1e-2)),
    ('adam_betas', dict(name='adam', learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-6),
     lambda: optax.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6)),
    ('adamw', dict(name='adamw', learning_rate=1e-2, weight_decay=0.1),
     lambda: optax.adamw(1e-2, weight_decay=0.1)),
    ('adamw_betas', dict(name='adamw', learning_rate=1e-2, weight_decay=0.1, b1=0.5, b2=0.9, eps=1e-4),
     lambda: optax.adamw(1e-2, b1=0.5, b2=0.9, eps=1e-4, weight_decay=0.1)),
    ('adamw_schedule', dict(name='adamw', learning_rate=SCHEDULE, weight_decay=0.05),
     lambda: optax.adamw(SCHEDULE, weight_decay=0.05)),
    ('sgd_schedule', dict(name='sgd', learning_rate=SCHEDULE, momentum=0.9),
     lambda: optax.sgd(SCHEDULE, momentum=0.9)),
]


@pytest.mark.parametrize('skip_nonfinite', [None, 2], ids=['no_skip', 'skip'])
@pytest.mark.parametrize('clip_norm', [None, 0.5], ids=['no_clip', 'clip'])
@pytest.mark.parametrize('kwargs, expected', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_updates_match_the_hand_built_optax_chain(kwargs, expected, clip_norm, skip_nonfinite):
  want_tx = expected()
  if clip_norm is not None:
    want_tx = optax.chain(optax.clip_by_global_norm(clip_norm), want_tx)
  if skip_nonfinite is not None:
    want_tx = optax.apply_if_finite(want_tx, max_consecutive_errors=skip_nonfinite)
  # Gradient norms are about 4 here, so clip_norm=0.5 really clips.
  got, _ = run(ft.make_optimizer(**kwargs, clip_norm=clip_norm, skip_nonfinite=skip_nonfinite))
  want, _ = run(want_tx)
  # inject_hyperparams holds b1, b2 and eps as float32 arrays where the plain
  # chain uses Python floats: the two round differently, by about 1e-6 of an
  # Adam step. A wrong chain (no clip, wrong decay or momentum) is off by far more.
  assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def test_clipping_changes_the_result():
  """The clip really acts (guards the test above against a clip that does nothing)."""
  clipped, _ = run(ft.make_optimizer('sgd', 0.1, clip_norm=0.5), num_steps=1)
  plain, _ = run(ft.make_optimizer('sgd', 0.1), num_steps=1)
  start = make_params()
  step_norm = float(optax.tree.norm(jax.tree.map(jnp.subtract, clipped, start)))
  np.testing.assert_allclose(step_norm, 0.1 * 0.5, rtol=1e-5)
  assert float(optax.tree.norm(jax.tree.map(jnp.subtract, plain, start))) > 2 * step_norm


def test_sgd_weight_decay_equals_an_l2_term_in_the_loss():
  wd = 0.1
  params = make_params()
  target = make_grads(0)

  def loss(p):
    return sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)

  def l2_loss(p):
    return loss(p) + wd / 2 * sum(jnp.sum(v ** 2) for v in p.values())

  def train(tx, loss_fn):
    p, state = params, tx.init(params)
    for _ in range(3):
      updates, state = tx.update(jax.grad(loss_fn)(p), state, p)
      p = optax.apply_updates(p, updates)
    return p

  got = train(ft.make_optimizer('sgd', 0.05, momentum=0.9, weight_decay=wd), loss)
  want = train(optax.sgd(0.05, momentum=0.9), l2_loss)
  assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw'])
@pytest.mark.parametrize('clip_norm', [None, 1.0])
@pytest.mark.parametrize('skip_nonfinite', [None, 3])
def test_current_learning_rate_and_train_step_see_the_schedule(name, clip_norm, skip_nonfinite):
  schedule = optax.linear_schedule(0.1, 0.0, transition_steps=10)
  tx = ft.make_optimizer(name, schedule, clip_norm=clip_norm, skip_nonfinite=skip_nonfinite)
  model = ft.MLP(64, (8,), 10, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  np.testing.assert_allclose(ft.current_learning_rate(optimizer), 0.1, rtol=1e-6)
  step = ft.make_train_step()
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
           'label': rng.integers(0, 10, size=8).astype(np.int32)}
  for i in range(3):
    metrics = step(model, optimizer, batch)
    # The rate that update i used, which is schedule(i).
    np.testing.assert_allclose(metrics['learning_rate'], schedule(i), rtol=1e-6)
  np.testing.assert_allclose(ft.current_learning_rate(optimizer), schedule(2), rtol=1e-6)


def test_constant_learning_rate_is_readable():
  model = ft.MLP(64, (8,), 10, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ft.make_optimizer('adamw', 3e-3, weight_decay=1e-4), wrt=nnx.Param)
  np.testing.assert_allclose(ft.current_learning_rate(optimizer), 3e-3, rtol=1e-6)


def test_skip_nonfinite_skips_bad_updates_then_gives_up():
  tx = ft.make_optimizer('adam', 1e-2, skip_nonfinite=2)
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), make_grads(0))
  for _ in range(2):  # skipped: zero updates, moments untouched
    updates, state = update(bad, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 2
  updates, state = update(bad, state, params)  # the third in a row is applied
  assert any(bool(jnp.any(jnp.isnan(u))) for u in jax.tree.leaves(updates))
  # A finite update after a skipped one equals a fresh first Adam step: the
  # skipped update left the moments and the step count alone.
  state = tx.init(params)
  _, state = tx.update(bad, state, params)
  got, _ = tx.update(make_grads(1), state, params)
  fresh = ft.make_optimizer('adam', 1e-2)
  want, _ = fresh.update(make_grads(1), fresh.init(params), params)
  assert_trees_close(got, want, rtol=1e-6)


def test_without_skip_nonfinite_a_nan_reaches_the_params():
  tx = ft.make_optimizer('sgd', 0.1)
  params = make_params()
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), make_grads(0))
  updates, _ = tx.update(bad, tx.init(params), params)
  assert any(bool(jnp.any(jnp.isnan(u))) for u in jax.tree.leaves(updates))


def test_returns_a_gradient_transformation():
  assert isinstance(ft.make_optimizer('sgd', 0.1), optax.GradientTransformation)


@pytest.mark.parametrize('kwargs, argument, fragment', [
    (dict(name='rmsprop', learning_rate=0.1), 'name', "expected one of ['sgd', 'adam', 'adamw'], got 'rmsprop'"),
    (dict(name='Adam', learning_rate=0.1), 'name', "got 'Adam'"),
    (dict(name='sgd', learning_rate=0.0), 'learning_rate', 'got 0.0'),
    (dict(name='sgd', learning_rate=-1e-3), 'learning_rate', 'got -0.001'),
    (dict(name='sgd', learning_rate=float('nan')), 'learning_rate', 'got nan'),
    (dict(name='sgd', learning_rate='1e-3'), 'learning_rate', "got '1e-3'"),
    (dict(name='sgd', learning_rate=True), 'learning_rate', 'got True'),
    (dict(name='adamw', learning_rate=0.1, weight_decay=-0.1), 'weight_decay', 'got -0.1'),
    (dict(name='adamw', learning_rate=0.1, weight_decay=float('inf')), 'weight_decay', 'got inf'),
    (dict(name='adam', learning_rate=0.1, weight_decay=1e-4), 'weight_decay', "use 'adamw'"),
    (dict(name='sgd', learning_rate=0.1, clip_norm=0.0), 'clip_norm', 'got 0.0'),
    (dict(name='sgd', learning_rate=0.1, clip_norm=-1.0), 'clip_norm', 'got -1.0'),
    (dict(name='sgd', learning_rate=0.1, momentum=1.0), 'momentum', 'in [0, 1), got 1.0'),
    (dict(name='sgd', learning_rate=0.1, momentum=-0.1), 'momentum', 'in [0, 1), got -0.1'),
    (dict(name='adam', learning_rate=0.1, momentum=0.9), 'momentum', "applies to 'sgd' only"),
    (dict(name='adam', learning_rate=0.1, b1=1.0), 'b1', 'in [0, 1), got 1.0'),
    (dict(name='adamw', learning_rate=0.1, b2=-0.5), 'b2', 'in [0, 1), got -0.5'),
    (dict(name='adam', learning_rate=0.1, eps=0.0), 'eps', 'got 0.0'),
    (dict(name='sgd', learning_rate=0.1, b1=0.9), 'b1', "applies to 'adam' and 'adamw' only"),
    (dict(name='sgd', learning_rate=0.1, skip_nonfinite=0), 'skip_nonfinite', 'got 0'),
    (dict(name='sgd', learning_rate=0.1, skip_nonfinite=2.5), 'skip_nonfinite', 'got 2.5'),
    (dict(name='sgd', learning_rate=0.1, skip_nonfinite=True), 'skip_nonfinite', 'got True'),
])
def test_invalid_input_is_a_value_error_naming_the_argument(kwargs, argument, fragment):
  with pytest.raises(ValueError) as info:
    ft.make_optimizer(**kwargs)
  message = str(info.value)
  assert message.startswith(f'{argument}: '), message
  assert fragment in message, message


@pytest.mark.parametrize('schedule, match', [
    (lambda step: jnp.float32(jnp.nan), r'learning_rate: expected the schedule to give a finite rate >= 0, got nan at step 0'),
    (lambda step: -1e-3 + 0 * step, r'finite rate >= 0, got -0.001 at step 0'),
    (lambda step: jnp.ones(3) * 1e-3, r'expected the schedule to return a scalar rate, got float32 shape \(3,\)'),
    (lambda: 1e-3, r'calling the schedule at step 0 failed \(TypeError'),
], ids=['nan', 'negative', 'not_scalar', 'wrong_arguments'])
def test_a_schedule_that_gives_no_usable_rate_is_named(schedule, match):
  with pytest.raises(ValueError, match=match):
    ft.make_optimizer('adam', schedule)
