"""flaxtrain.debug: each tool on known input, and its errors on bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft
from flaxtrain import debug


def make_batch(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return {
      'image': rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
      'label': rng.integers(0, 10, size=n).astype(np.int32),
  }


def make_model(seed=0, **kwargs):
  return ft.MLP(64, (16, 8), 10, rngs=nnx.Rngs(seed), **kwargs)


def loss_grads(model, batch):
  return nnx.grad(lambda m: ft.classification_loss(m, batch)[0])(model)


def params_copy(model):
  return jax.tree.map(np.array, nnx.state(model, nnx.Param))


# grad_norms ------------------------------------------------------------------

def test_grad_norms_per_layer_match_numpy_and_add_up_to_the_global_norm():
  model = make_model(dropout_rate=0.1)  # RNG state in the tree must be ignored
  grads = loss_grads(model, make_batch())
  norms = debug.grad_norms(grads)
  assert list(norms) == ['hidden/0', 'hidden/1', 'out']
  want = np.sqrt(np.sum(np.square(grads['hidden'][0]['kernel'][...]))
                 + np.sum(np.square(grads['hidden'][0]['bias'][...])))
  np.testing.assert_allclose(norms['hidden/0'], want, rtol=1e-5)
  total = np.sqrt(sum(float(v) ** 2 for v in norms.values()))
  np.testing.assert_allclose(total, optax.tree.norm(grads), rtol=1e-5)


def test_grad_norms_per_leaf_and_under_jit():
  grads = loss_grads(make_model(), make_batch())
  leaves = jax.jit(lambda g: debug.grad_norms(g, by='leaf'))(grads)
  assert set(leaves) == {f'{layer}/{name}' for layer in ('hidden/0', 'hidden/1', 'out')
                         for name in ('kernel', 'bias')}
  np.testing.assert_allclose(leaves['out/bias'], np.linalg.norm(grads['out']['bias'][...]), rtol=1e-5)


def test_grad_norms_rejects_bad_input():
  with pytest.raises(ValueError, match="by: expected 'layer' or 'leaf', got 'module'"):
    debug.grad_norms({'w': jnp.ones(2)}, by='module')
  with pytest.raises(ValueError, match='grads: expected a pytree with at least one floating-point'):
    debug.grad_norms({'step': jnp.array(3)})
  with pytest.raises(ValueError, match='grads: expected'):
    debug.grad_norms([])


# finite checks -----------------------------------------------------------------

def test_find_nonfinite_names_each_bad_leaf_with_its_counts():
  tree = {'a': jnp.ones(3), 'b': jnp.array([jnp.nan, jnp.inf, -jnp.inf, jnp.nan]),
          'c': {'d': jnp.array([[1.0, jnp.inf]])}, 'n': jnp.array([1, 2])}
  found = debug.find_nonfinite(tree)
  assert found == [debug.NonFinite('b', nan=2, posinf=1, neginf=1, size=4),
                   debug.NonFinite('c/d', nan=0, posinf=1, neginf=0, size=2)]
  assert debug.find_nonfinite({'a': jnp.ones(3)}) == []


def test_check_finite_raises_naming_the_first_bad_array_of_a_model_state():
  model = make_model()
  params = nnx.state(model, nnx.Param)
  debug.check_finite(params, 'params')  # finite: no error
  bad = jax.tree.map(lambda x: x, params)
  bad['hidden'][1]['kernel'] = bad['hidden'][1]['kernel'][...].at[0, 0].set(jnp.nan)
  bad['out']['bias'] = bad['out']['bias'][...].at[:2].set(jnp.inf)
  with pytest.raises(FloatingPointError, match=r'params: first non-finite array is hidden/1/kernel: '
                     r'1 NaN of 128 values \(2 arrays affected: hidden/1/kernel, out/bias\)') as info:
    debug.check_finite(bad, 'params')
  assert [f.path for f in info.value.found] == ['hidden/1/kernel', 'out/bias']


def test_finite_checks_reject_bad_input():
  with pytest.raises(ValueError, match='tree: expected a pytree with at least one floating-point array'):
    debug.find_nonfinite({'key': jax.random.key(0), 'count': jnp.array(1)})
  with pytest.raises(TypeError, match='name: expected a str'):
    debug.check_finite({'a': jnp.ones(2)}, name=3)


# layer outputs and dead units -----------------------------------------------------

def test_layer_outputs_records_each_linear_and_restores_the_class():
  model = make_model()
  x = make_batch()['image']
  call = nnx.Linear.__call__
  outputs = debug.layer_outputs(model, x, nnx.Linear)
  assert nnx.Linear.__call__ is call
  assert list(outputs) == ['hidden/0', 'hidden/1', 'out']
  h0 = x.reshape(16, -1) @ model.hidden[0].kernel[...] + model.hidden[0].bias[...]
  np.testing.assert_allclose(outputs['hidden/0'], h0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outputs['out'], model(x), rtol=1e-6)


def test_layer_outputs_restores_the_class_when_the_model_fails():
  call = nnx.Linear.__call__
  with pytest.raises(ValueError, match='x: expected 64 features'):
    debug.layer_outputs(make_model(), jnp.ones((2, 5)))
  assert nnx.Linear.__call__ is call


def test_layer_outputs_rejects_bad_input():
  with pytest.raises(TypeError, match='model: expected an nnx.Module, got function'):
    debug.layer_outputs(lambda x: x, jnp.ones(2))
  with pytest.raises(TypeError, match='types: expected an nnx.Module subclass'):
    debug.layer_outputs(make_model(), jnp.ones((2, 64)), types=int)
  with pytest.raises(ValueError, match=r"model: expected submodules of type \['Conv'\], found none in MLP"):
    debug.layer_outputs(make_model(), jnp.ones((2, 64)), types=nnx.Conv)


def test_layer_outputs_refuses_a_layer_called_twice():
  class Twice(nnx.Module):
    def __init__(self):
      self.layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.layer(self.layer(x))

  with pytest.raises(ValueError, match="layer 'layer' is called more than once"):
    debug.layer_outputs(Twice(), jnp.ones((1, 2)))


def test_dead_relu_fraction_counts_units_never_positive():
  x = jnp.array([[-1.0, 2.0, 0.0, -0.5], [-3.0, -1.0, 0.0, 0.1]])
  assert debug.dead_relu_fraction(x) == 0.5           # units 0 and 2 never > 0
  assert debug.dead_relu_fraction(jax.nn.relu(x)) == 0.5  # same on the ReLU's output
  conv = jnp.ones((2, 3, 3, 4)).at[..., 1].set(-1.0).at[0, 0, 0, 1].set(1.0)
  assert debug.dead_relu_fraction(conv) == 0.0        # one positive position keeps a channel alive
  assert debug.dead_relu_fraction(conv.at[..., 1].set(-1.0)) == 0.25


def test_dead_relu_fraction_rejects_bad_input():
  with pytest.raises(ValueError, match=r'pre_activations: expected an array \(batch, \.\.\., units\).*shape \(3,\)'):
    debug.dead_relu_fraction(jnp.ones(3))
  with pytest.raises(ValueError, match='pre_activations: expected a floating-point array, got dtype int32'):
    debug.dead_relu_fraction(jnp.ones((2, 3), dtype=jnp.int32))
  with pytest.raises(ValueError, match=r'pre_activations: expected a non-empty array, got shape \(0, 3\)'):
    debug.dead_relu_fraction(jnp.ones((0, 3)))
  with pytest.raises(ValueError, match='pre_activations: expected an array'):
    debug.dead_relu_fraction([[1.0, 2.0]])


# overfit_one_batch -------------------------------------------------------------

def test_overfit_one_batch_reaches_the_threshold_and_leaves_the_model_alone():
  model = make_model(dropout_rate=0.0)
  before = params_copy(model)
  batch = make_batch(n=8)
  result = debug.overfit_one_batch(model, optax.adam(3e-2), batch, max_steps=300, threshold=0.01)
  assert result.reached and result.final_loss < 0.01
  assert result.steps == len(result.losses) < 300   # stopped at the first loss below the threshold
  assert np.all(result.losses[:-1] >= 0.01)
  jax.tree.map(np.testing.assert_array_equal, params_copy(model), before)


def test_overfit_one_batch_reports_failure_when_the_rate_is_zero():
  model = make_model()
  result = debug.overfit_one_batch(model, optax.sgd(0.0), make_batch(), max_steps=5)
  assert not result.reached and result.steps == 5
  assert np.ptp(result.losses) == 0.0   # nothing moved


def test_overfit_one_batch_refuses_a_step_that_returns_a_tuple():
  train_step = ft.make_train_step()

  def tuple_step(model, optimizer, batch):
    metrics = train_step(model, optimizer, batch)
    return metrics['loss'], metrics

  with pytest.raises(TypeError, match="step: expected it to return a dict of metrics with a 'loss' entry.*got tuple"):
    debug.overfit_one_batch(make_model(), optax.sgd(0.1), make_batch(), step=tuple_step)


@pytest.mark.parametrize('kwargs, message', [
    (dict(model='mlp'), 'model: expected an nnx.Module, got str'),
    (dict(tx=0.01), 'tx: expected an optax.GradientTransformation'),
    (dict(batch=[1, 2]), 'batch: expected a non-empty dict of arrays, got list'),
    (dict(step='fast'), 'step: expected a callable'),
    (dict(max_steps=0), 'max_steps: expected a positive int, got 0'),
    (dict(threshold=-1.0), 'threshold: expected a finite number > 0, got -1.0'),
])
def test_overfit_one_batch_rejects_bad_input(kwargs, message):
  args = dict(model=make_model(), tx=optax.sgd(0.1), batch=make_batch())
  args.update(kwargs)
  with pytest.raises((TypeError, ValueError), match=message):
    debug.overfit_one_batch(args.pop('model'), args.pop('tx'), args.pop('batch'), **args)


# count_compilations ------------------------------------------------------------

def test_count_compilations_sees_new_shapes_only():
  @jax.jit
  def double_it(x):
    return 2 * x

  with debug.count_compilations() as compiled:
    double_it(jnp.ones(3))
    double_it(jnp.zeros(3))     # same shape: served from the cache
    double_it(jnp.ones(4))      # new shape: compiles again
  assert compiled.of('double_it') == 2
  assert len(compiled.seconds) == compiled.count and min(compiled.seconds) > 0
  with debug.count_compilations() as again:
    double_it(jnp.ones(4))
  assert again.of('double_it') == 0
  double_it(jnp.ones(5))          # outside any block: not counted
  assert compiled.of('double_it') == 2


def test_count_compilations_catches_a_ragged_last_batch_in_a_train_step():
  @nnx.jit
  def train_step(model, optimizer, batch):
    grads = nnx.grad(lambda m: ft.classification_loss(m, batch)[0])(model)
    optimizer.update(model, grads)

  model = make_model()
  optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
  data = make_batch(n=40)
  with debug.count_compilations() as compiled:
    for start in range(0, 40, 16):   # batches of 16, 16 and 8
      train_step(model, optimizer, {k: v[start:start + 16] for k, v in data.items()})
  assert compiled.of('train_step') == 2
  assert compiled.count == 2        # nothing else compiled


def test_compilations_of_rejects_bad_input():
  with pytest.raises(ValueError, match="name: expected a non-empty str, got ''"):
    debug.Compilations().of('')


# throughput --------------------------------------------------------------------

def test_throughput_counts_examples_and_runs_the_step_on_every_batch():
  batches = [make_batch(i, n=4) for i in range(3)]
  seen = []

  def step(batch):
    seen.append(batch)
    return jnp.sum(batch['image'])

  speed = debug.throughput(batches, step, num_batches=5, rounds=2)
  assert speed.rounds == 2 and speed.loader > 0 and speed.step > 0 and speed.both > 0
  # one warm-up call, then per round 5 batches for the step alone and 5 for both
  assert len(seen) == 1 + 2 * (5 + 5)
  assert all(s is b for s, b in zip(seen[1:6], batches + batches[:2]))  # passes restart


def test_throughput_without_a_step_and_with_masks():
  loader = ft.DataLoader(make_batch(n=20), batch_size=8, remainder='pad')
  speed = debug.throughput(loader, num_batches=3, rounds=1)
  assert speed.step is None and speed.both is None and speed.loader > 0


def test_throughput_rejects_bad_input():
  with pytest.raises(TypeError, match='loader: expected something that can be iterated more than once'):
    debug.throughput(iter([make_batch()]))
  with pytest.raises(TypeError, match='step: expected a callable'):
    debug.throughput([make_batch()], step=3)
  with pytest.raises(ValueError, match='num_batches: expected a positive int, got 0'):
    debug.throughput([make_batch()], num_batches=0)
  with pytest.raises(ValueError, match='loader: expected it to yield batches, got an empty pass'):
    debug.throughput([])
  with pytest.raises(ValueError, match='loader: expected batches of arrays with a leading batch axis'):
    debug.throughput([{'x': 1.0}])
