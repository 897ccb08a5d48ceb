"""Train and eval steps: the update they apply, the metrics they return, and modes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft


def make_batch(seed, n=16):
  rng = np.random.default_rng(seed)
  return {
      'image': rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
      'label': rng.integers(0, 10, size=n).astype(np.int32),
  }


def make_model(seed=0, **kwargs):
  return ft.MLP(64, (16,), 10, rngs=nnx.Rngs(seed), **kwargs)


def test_train_step_applies_the_sgd_update_to_the_batch_it_is_given():
  model = make_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = make_batch(0)

  def pure_loss(p):
    return ft.classification_loss(nnx.merge(graphdef, p, rest), batch)[0]

  loss_want, grads_want = jax.value_and_grad(pure_loss)(params)
  lr = 0.1
  # Computed before the step: the split state shares the model's variables.
  want = jax.tree.map(lambda p, g: np.asarray(p - lr * g), params, grads_want)
  norm_want = float(optax.tree.norm(grads_want))
  optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
  metrics = ft.make_train_step()(model, optimizer, batch)

  np.testing.assert_allclose(metrics['loss'], loss_want, rtol=1e-6)
  np.testing.assert_allclose(metrics['grad_norm'], norm_want, rtol=1e-6)
  got = nnx.state(model, nnx.Param)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  assert set(metrics) == {'loss', 'grad_norm', 'accuracy'}  # no learning_rate without inject_hyperparams


def test_train_step_compiles_once_and_uses_each_batch():
  traces = []

  def loss_fn(model, batch):
    traces.append(1)
    return ft.classification_loss(model, batch)

  model = make_model()
  optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)  # lr 0: the model never changes
  step = ft.make_train_step(loss_fn)
  losses = [float(step(model, optimizer, make_batch(seed))['loss']) for seed in range(4)]
  assert len(traces) == 1, 'the step retraced for batches of the same shape'
  assert len(set(losses)) == 4, 'different batches must give different losses'


def test_grad_norm_is_measured_before_clipping():
  model = make_model()
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(0.1)), wrt=nnx.Param)
  metrics = ft.make_train_step()(model, optimizer, make_batch(0))
  assert float(metrics['grad_norm']) > 1e-2


def test_learning_rate_is_reported_when_injected():
  model = make_model()
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.0, 1.0, 4))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = ft.make_train_step()
  rates = [float(step(model, optimizer, make_batch(i))['learning_rate']) for i in range(3)]
  np.testing.assert_allclose(rates, [0.0, 0.25, 0.5], rtol=1e-6)
  np.testing.assert_allclose(ft.current_learning_rate(optimizer), 0.5, rtol=1e-6)


def test_current_learning_rate_is_none_without_injection():
  optimizer = nnx.Optimizer(make_model(), optax.adam(1e-3), wrt=nnx.Param)
  assert ft.current_learning_rate(optimizer) is None


@pytest.mark.parametrize(
    'loss_fn, error, match',
    [
        (lambda m, b: (jnp.ones(3), {}), ValueError, r'loss_fn: expected a scalar loss .*got shape \(3,\)'),
        (lambda m, b: jnp.float32(1.0), TypeError, r'loss_fn: expected loss_fn\(model, batch\) to return a pair '
                                                   r'\(loss, aux\).*got an array of shape \(\)'),
        (lambda m, b: (jnp.float32(1.0),), TypeError, r'return a pair \(loss, aux\).*got a tuple of 1'),
        (lambda m, b: (jnp.float32(1.0), [1]), TypeError, 'loss_fn: expected aux to be a dict'),
        (lambda m, b: (jnp.float32(1.0), {'x': jnp.ones(2)}), ValueError, r"expected aux\['x'\] to be a scalar"),
        (lambda m, b: (jnp.float32(1.0), {'grad_norm': 1.0}), ValueError, "aux key 'grad_norm' is reserved"),
    ],
)
def test_bad_loss_fn_output_is_a_clear_error(loss_fn, error, match):
  model = make_model()
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(error, match=match):
    ft.make_train_step(loss_fn)(model, optimizer, make_batch(0))


def test_eval_step_rejects_a_non_scalar_loss():
  with pytest.raises(ValueError, match=r'loss_fn: expected a scalar loss .*got shape \(16,\)'):
    ft.make_eval_step(lambda m, b: (m(b['image']).sum(-1), {}))(make_model(), make_batch(0))


def test_loss_fn_must_be_callable():
  with pytest.raises(TypeError, match='loss_fn: expected a callable'):
    ft.make_train_step('cross_entropy')
  with pytest.raises(TypeError, match='loss_fn: expected a callable'):
    ft.make_eval_step(None)


def test_eval_step_uses_evaluation_mode_without_changing_the_model():
  model = ft.CNN(rngs=nnx.Rngs(0), dropout_rate=0.5, batch_norm=True)
  batch = make_batch(0)
  stats_before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  eval_step = ft.make_eval_step()
  first, second = eval_step(model, batch), eval_step(model, batch)
  assert float(first['loss']) == float(second['loss']), 'Dropout must be off in evaluation'
  assert model.dropout.deterministic is False and model.norm1.use_running_average is False
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), stats_before)
  # In training mode the same model is random (Dropout) and updates BatchNorm statistics.
  train_a, train_b = model(batch['image']), model(batch['image'])
  assert not np.allclose(train_a, train_b)


def test_evaluate_weights_padded_batches_by_count():
  model = make_model()
  data = make_batch(3, n=50)
  loader = ft.DataLoader(data, 16, shuffle=False, remainder='pad')  # 16+16+16+2 (padded)
  summary = ft.evaluate(ft.make_eval_step(), model, loader)
  logits = model(data['image'])
  np.testing.assert_allclose(
      summary['loss'], ft.softmax_cross_entropy_with_integer_labels(logits, data['label']), rtol=1e-5)
  np.testing.assert_allclose(summary['accuracy'], ft.accuracy(logits, data['label']), rtol=1e-6)
  assert summary['count'] == 50


def test_evaluate_rejects_no_batches():
  with pytest.raises(ValueError, match='batches: expected at least one batch'):
    ft.evaluate(ft.make_eval_step(), make_model(), [])


# Bad input to the train step ----------------------------------------------------


def test_train_step_without_the_optimizer_says_so():
  model = make_model()
  with pytest.raises(TypeError, match=r'train_step: expected train_step\(model, optimizer, batch\), got 2 '
                                      'arguments; the optimizer is missing'):
    ft.make_train_step()(model, make_batch(0))


def test_train_step_rejects_an_optimizer_built_for_another_model():
  model = make_model()
  other = ft.MLP(64, (32,), 10, rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(other, optax.adam(1e-3), wrt=nnx.Param)
  before = np.array(model.out.kernel[...])
  with pytest.raises(ValueError, match='optimizer: its state does not fit model'):
    ft.make_train_step()(model, optimizer, make_batch(0))
  np.testing.assert_array_equal(model.out.kernel[...], before)


@pytest.mark.parametrize('args, match', [
    (('model', 'optimizer', {}), 'model: expected an nnx.Module, got str'),
    ((None, optax.adam(1e-3), {}), 'model: expected an nnx.Module, got NoneType'),
])
def test_train_step_rejects_arguments_of_the_wrong_type(args, match):
  with pytest.raises(TypeError, match=match):
    ft.make_train_step()(*args)


def test_train_step_rejects_an_optax_transformation_as_optimizer():
  with pytest.raises(TypeError, match=r'optimizer: expected an nnx.Optimizer\(model, tx, wrt=nnx.Param\), got '
                                      'GradientTransformationExtraArgs'):
    ft.make_train_step()(make_model(), optax.adam(1e-3), make_batch(0))


@pytest.mark.parametrize('loss_fn, match', [
    (lambda model: None, r'loss_fn: expected a function called as loss_fn\(model, batch\).*\(model\)'),
    (lambda model, batch, rng: None, r'cannot be called with \(model, batch\)'),
])
def test_loss_fn_with_the_wrong_arguments_is_rejected_when_the_step_is_made(loss_fn, match):
  with pytest.raises(TypeError, match=match):
    ft.make_train_step(loss_fn)


def test_classification_loss_names_the_missing_batch_keys():
  model = make_model()
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  batch = make_batch(0)
  with pytest.raises(ValueError, match=r"batch: classification_loss expects the keys 'image' and 'label'.*"
                                       r"got keys \['image', 'y'\]"):
    ft.make_train_step()(model, optimizer, {'image': batch['image'], 'y': batch['label']})
  with pytest.raises(TypeError, match=r"batch: classification_loss expects a dict.*got a tuple of 2"):
    ft.make_train_step()(model, optimizer, (batch['image'], batch['label']))


def test_many_refuses_a_single_batch_passed_as_k_steps():
  """An unstacked batch of 16 rows would otherwise train 16 steps of one example each, silently."""
  model = make_model()
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(ValueError, match=r"batches: expected K batches stacked on a new leading axis.*"
                                       r"batches\['label'\] of shape \(16,\), which has no batch axis per step"):
    ft.make_train_step().many(model, optimizer, make_batch(0))


def test_a_second_model_of_the_same_structure_compiles_no_step():
  step = ft.make_train_step()
  model = make_model()
  step(model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param), make_batch(0))
  other = make_model(seed=9)
  other_optimizer = nnx.Optimizer(other, optax.adam(1e-3), wrt=nnx.Param)
  with ft.debug.count_compilations() as compiled:
    ft.make_train_step()(other, other_optimizer, make_batch(1))
  assert 'jit(train_arrays)' not in compiled.names
