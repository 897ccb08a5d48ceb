"""flaxtrain.losses against NumPy references, under jax.jit, plus bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.fixture
def logits_and_labels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(7, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, size=7).astype(np.int32)
  return logits, labels


@pytest.mark.parametrize('use_mask', [False, True], ids=['plain', 'masked'])
def test_integer_cross_entropy_matches_numpy(logits_and_labels, use_mask):
  logits, labels = logits_and_labels
  mask = np.array([1, 1, 0, 1, 0, 1, 1], np.float32) if use_mask else None
  got = jax.jit(ft.softmax_cross_entropy_with_integer_labels)(logits, labels, mask)
  per_example = -np_log_softmax(logits)[np.arange(7), labels]
  want = per_example[mask == 1].mean() if use_mask else per_example.mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_one_hot_cross_entropy_matches_integer_version(logits_and_labels):
  logits, labels = logits_and_labels
  one_hot = jax.nn.one_hot(labels, 5)
  got = jax.jit(ft.softmax_cross_entropy)(logits, one_hot)
  want = ft.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got, optax.softmax_cross_entropy(logits, one_hot).mean(), rtol=1e-6)


def test_cross_entropy_is_finite_for_huge_logits():
  logits = jnp.array([[1000.0, 0.0], [0.0, -1000.0]])
  loss = ft.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 1]))
  np.testing.assert_allclose(loss, 1000.0, rtol=1e-6)  # each example: label 1 sits 1000 below the max


def test_mean_squared_error_matches_numpy():
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(2, 6, 3)).astype(np.float32)
  got = jax.jit(ft.mean_squared_error)(pred, target)
  np.testing.assert_allclose(got, ((pred - target) ** 2).mean(), rtol=1e-6)


def test_masked_mean_ignores_masked_examples_and_handles_empty_mask():
  values = jnp.array([1.0, 2.0, 1e6])
  assert float(ft.masked_mean(values, jnp.array([1, 1, 0]))) == 1.5
  assert float(ft.masked_mean(values, jnp.zeros(3))) == 0.0


class WithState(nnx.Module):
  """A model with BatchNorm statistics, Dropout RNG state and a Param."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)


def test_l2_penalty_sums_params_only():
  model = WithState(nnx.Rngs(0))
  model.norm.mean.set_value(jnp.full((4,), 100.0))  # non-parameter state must not count
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  want = sum(float(np.sum(np.asarray(p) ** 2)) for p in params)
  np.testing.assert_allclose(ft.l2_penalty(model), want, rtol=1e-6)
  assert ft.l2_penalty(model) < 400.0  # 4 * 100**2 would be in it otherwise


def test_l2_penalty_is_differentiable_with_nnx_grad():
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  grads = nnx.grad(ft.l2_penalty)(model)
  np.testing.assert_allclose(grads['kernel'][...], 2 * model.kernel[...], rtol=1e-6)


@pytest.mark.parametrize(
    'fn, args, match',
    [
        (ft.softmax_cross_entropy_with_integer_labels, (jnp.zeros((4, 3)), jnp.zeros((4, 3), jnp.int32)),
         r'labels: expected shape \(4,\)'),
        (ft.softmax_cross_entropy_with_integer_labels, (jnp.zeros((4, 3)), jnp.zeros(4)),
         'labels: expected an integer array, got dtype float32'),
        (ft.softmax_cross_entropy_with_integer_labels, (jnp.zeros((4, 3), jnp.int32), jnp.zeros(4, jnp.int32)),
         'logits: expected a floating-point array'),
        (ft.softmax_cross_entropy, (jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)),
         r'labels: expected a floating-point array'),
        (ft.softmax_cross_entropy, (jnp.zeros((4, 3)), jnp.zeros((4, 2))),
         r'labels: expected shape \(4, 3\) .*got \(4, 2\)'),
        (ft.mean_squared_error, (jnp.zeros((4, 1)), jnp.zeros(4)),
         r'targets: expected shape \(4, 1\) .*got \(4,\)'),
        (ft.mean_squared_error, (jnp.zeros(()), jnp.zeros(())), 'predictions: expected an array with a batch axis'),
        (ft.masked_mean, (jnp.zeros(4), jnp.zeros(3)), r'mask: expected shape \(4,\)'),
    ],
)
def test_bad_input_names_the_argument(fn, args, match):
  with pytest.raises(ValueError, match=match):
    fn(*args)
  with pytest.raises(ValueError, match=match):  # the same error while tracing
    jax.jit(fn)(*args)


@pytest.mark.parametrize('bad', [-1, 3, 100])
def test_labels_outside_the_classes_give_a_nan_loss_also_under_jit(bad):
  logits = jnp.zeros((4, 3))
  labels = jnp.array([0, 1, bad, 2])
  fn = jax.jit(ft.softmax_cross_entropy_with_integer_labels)
  assert np.isnan(fn(logits, labels))
  if bad == -1:  # optax alone wraps -1 round to the last class: a finite, wrong loss
    assert np.isfinite(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
  # A masked-out example may hold any label (e.g. -1 as "ignore"): loss and gradient stay finite.
  mask = jnp.array([1, 1, 0, 1])
  np.testing.assert_allclose(fn(logits, labels, mask), np.log(3.0), rtol=1e-6)
  grads = jax.grad(lambda x: fn(x, labels, mask))(logits)
  assert np.isfinite(grads).all() and not np.any(grads[2])


def test_l2_penalty_on_a_dict_of_arrays_sums_every_array():
  params = {'w': jnp.full((2, 3), 2.0), 'b': jnp.array([1.0, -1.0])}
  np.testing.assert_allclose(ft.l2_penalty(params), 6 * 4.0 + 2.0)
  np.testing.assert_allclose(ft.l2_penalty(nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)),
                             ft.l2_penalty(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), rtol=1e-6)


@pytest.mark.parametrize('tree, match', [
    ({}, 'model: expected an nnx.Module or a pytree of float arrays, got dict with no arrays'),
    ({'w': jnp.ones(2), 'step': jnp.int32(3)}, r"model: expected float arrays in the pytree, got .* int32 at \['step'\]"),
    ([1.0, 2.0], r'model: expected float arrays in the pytree, got float'),
])
def test_l2_penalty_refuses_a_pytree_it_cannot_sum(tree, match):
  with pytest.raises(TypeError, match=match):
    ft.l2_penalty(tree)


def test_loss_fn_protocol_documents_the_contract():
  import inspect
  doc = inspect.getdoc(ft.LossFn)
  for word in ('(loss, aux)', "'mask'", 'scalar', 'batch'):
    assert word in doc
