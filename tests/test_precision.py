"""flaxtrain.precision: dynamic loss scaling under jax.jit, diagnostics, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxtrain as ft
from flaxtrain import precision


def run_adjust(loss_scale, pattern):
  """Applies adjust_loss_scale under jit for each bool in pattern; returns (scales, good_steps)."""
  adjust = jax.jit(precision.adjust_loss_scale)
  scales, goods = [], []
  for finite in pattern:
    loss_scale = adjust(loss_scale, jnp.asarray(finite))
    scales.append(float(loss_scale.scale))
    goods.append(int(loss_scale.good_steps))
  return scales, goods


# --- dynamic_loss_scale ------------------------------------------------------------------------


def test_dynamic_loss_scale_initial_state_and_static_config():
  ls = precision.dynamic_loss_scale(
      1024.0, growth_interval=7, growth_factor=4.0, backoff_factor=0.25, min_scale=2.0)
  assert ls.scale.dtype == jnp.float32 and ls.scale.shape == () and float(ls.scale) == 1024.0
  assert ls.good_steps.dtype == jnp.int32 and ls.good_steps.shape == () and int(ls.good_steps) == 0
  assert (ls.growth_interval, ls.growth_factor, ls.backoff_factor, ls.min_scale) == (7, 4.0, 0.25, 2.0)
  # Only the two arrays are pytree leaves; the factors are static (part of the treedef).
  assert len(jax.tree.leaves(ls)) == 2
  other = precision.dynamic_loss_scale(1024.0, growth_interval=8)
  assert jax.tree.structure(ls) != jax.tree.structure(other)


def test_dynamic_loss_scale_defaults():
  ls = precision.dynamic_loss_scale()
  assert float(ls.scale) == 2.0**15
  assert (ls.growth_interval, ls.growth_factor, ls.backoff_factor, ls.min_scale) == (2000, 2.0, 0.5, 1.0)


@pytest.mark.parametrize('kwargs, match', [
    (dict(initial_scale=0.0), r'initial_scale: expected a finite float32 number >= min_scale \(1.0\), got 0.0'),
    (dict(initial_scale=0.5), r'initial_scale: expected .* >= min_scale \(1.0\), got 0.5'),
    (dict(initial_scale=float('inf')), r'initial_scale: expected .*, got inf'),
    (dict(initial_scale=1e39), r'initial_scale: expected a finite float32 number'),
    (dict(initial_scale='1024'), r"initial_scale: expected .*, got '1024'"),
    (dict(growth_interval=0), r'growth_interval: expected a positive int, got 0'),
    (dict(growth_interval=2.0), r'growth_interval: expected a positive int, got 2.0'),
    (dict(growth_factor=1.0), r'growth_factor: expected a finite number > 1, got 1.0'),
    (dict(growth_factor=float('nan')), r'growth_factor: expected a finite number > 1, got nan'),
    (dict(backoff_factor=1.0), r'backoff_factor: expected a number in \(0, 1\), got 1.0'),
    (dict(backoff_factor=0.0), r'backoff_factor: expected a number in \(0, 1\), got 0.0'),
    (dict(min_scale=0.0), r'min_scale: expected a finite float32 number > 0, got 0.0'),
    (dict(min_scale=-1.0), r'min_scale: expected a finite float32 number > 0, got -1.0'),
])
def test_dynamic_loss_scale_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    precision.dynamic_loss_scale(**kwargs)


# --- adjust_loss_scale -------------------------------------------------------------------------


def test_adjust_grows_after_growth_interval_finite_steps():
  ls = precision.dynamic_loss_scale(8.0, growth_interval=3)
  scales, goods = run_adjust(ls, [True] * 7)
  assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]
  assert goods == [1, 2, 0, 1, 2, 0, 1]


def test_adjust_backs_off_on_non_finite_and_restarts_the_count():
  ls = precision.dynamic_loss_scale(64.0, growth_interval=3, backoff_factor=0.25)
  scales, goods = run_adjust(ls, [True, True, False, True, True, True])
  assert scales == [64.0, 64.0, 16.0, 16.0, 16.0, 32.0]
  assert goods == [1, 2, 0, 1, 2, 0]


def test_adjust_never_goes_below_min_scale():
  ls = precision.dynamic_loss_scale(8.0, min_scale=3.0)
  scales, goods = run_adjust(ls, [False] * 4)
  assert scales == [4.0, 3.0, 3.0, 3.0]
  assert goods == [0, 0, 0, 0]


def test_adjust_does_not_grow_the_scale_to_infinity():
  ls = precision.dynamic_loss_scale(2.0**127, growth_interval=1)
  scales, goods = run_adjust(ls, [True, True])
  assert scales == [2.0**127, 2.0**127]
  assert goods == [0, 0]


def test_adjust_keeps_static_config_and_accepts_python_bools():
  ls = precision.dynamic_loss_scale(8.0, growth_interval=5, growth_factor=3.0, backoff_factor=0.5)
  new = precision.adjust_loss_scale(ls, False)
  assert (new.growth_interval, new.growth_factor, new.backoff_factor) == (5, 3.0, 0.5)
  assert new.scale.dtype == jnp.float32 and new.good_steps.dtype == jnp.int32
  assert float(precision.adjust_loss_scale(ls, True).scale) == 8.0


@pytest.mark.parametrize('grads_finite, match', [
    (jnp.array([True, False]), r'grads_finite: expected a boolean scalar .*, got shape \(2,\) dtype bool'),
    (jnp.float32(1.0), r'grads_finite: expected a boolean scalar .*, got shape \(\) dtype float32'),
    (1, r'grads_finite: expected a boolean scalar .*, got shape \(\) dtype int32'),
])
def test_adjust_rejects_bad_grads_finite(grads_finite, match):
  with pytest.raises(ValueError, match=match):
    precision.adjust_loss_scale(precision.dynamic_loss_scale(), grads_finite)


# --- scale_loss and unscale_grads -------------------------------------------------------------


def test_scale_loss_multiplies_in_at_least_float32():
  ls = precision.dynamic_loss_scale(2.0**15)
  got = jax.jit(precision.scale_loss)(jnp.float32(0.75), ls)
  assert float(got) == 0.75 * 2.0**15 and got.dtype == jnp.float32
  # 3.0 * 2**15 overflows float16 (max 65504); scaled in float32 it stays finite.
  got16 = precision.scale_loss(jnp.float16(3.0), ls)
  assert got16.dtype == jnp.float32 and float(got16) == 3.0 * 2.0**15


def test_unscale_grads_divides_in_float32_and_keeps_dtypes():
  ls = precision.dynamic_loss_scale(2.0**14)
  rng = np.random.default_rng(0)
  g32 = rng.normal(size=(4, 3)).astype(np.float32) * 2.0**14
  # A float16 gradient of 2**14 * 1e-7 is representable; divided in float16 arithmetic it
  # would be a subnormal, but the float32 result of 1e-7 is then rounded only once.
  g16 = np.array([2.0**14 * 1e-7, 2.0**14 * 3.0], np.float16)
  gbf = jnp.array([2.0**20, -2.0**15], jnp.bfloat16)
  grads = {'a': jnp.asarray(g32), 'b': {'c': jnp.asarray(g16), 'd': gbf}}
  got = jax.jit(precision.unscale_grads)(grads, ls)
  assert jax.tree.structure(got) == jax.tree.structure(grads)
  assert [x.dtype for x in jax.tree.leaves(got)] == [jnp.float32, jnp.float16, jnp.bfloat16]
  np.testing.assert_allclose(got['a'], g32 / 2.0**14, rtol=1e-7)
  want16 = (g16.astype(np.float32) / np.float32(2.0**14)).astype(np.float16)
  np.testing.assert_array_equal(np.asarray(got['b']['c']), want16)
  np.testing.assert_array_equal(np.asarray(got['b']['d'], np.float32), [64.0, -2.0])


def test_unscale_grads_handles_scales_beyond_float16_range():
  # 2**20 is inf in float16: dividing in float16 would turn every gradient into 0.
  ls = precision.dynamic_loss_scale(2.0**20)
  got = jax.jit(precision.unscale_grads)(jnp.array([2.0**10, -2.0**12], jnp.float16), ls)
  assert got.dtype == jnp.float16
  np.testing.assert_array_equal(np.asarray(got, np.float32), [2.0**-10, -2.0**-8])


def test_unscale_grads_works_on_nnx_state():
  model = ft.MLP(64, (8,), 10, rngs=nnx.Rngs(0))
  grads = nnx.grad(lambda m: 4.0 * jnp.sum(m(jnp.ones((2, 64)))))(model)
  plain = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 64)))))(model)
  got = precision.unscale_grads(grads, precision.dynamic_loss_scale(4.0))
  assert isinstance(got, nnx.State)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, plain)


def test_scaling_recovers_a_float16_gradient_that_underflows_without_it():
  # A float32 weight used in float16 compute, as with param_dtype=float32, dtype=float16.
  w = jnp.float32(1.0)
  x = jnp.float16(1e-4)
  loss_fn = lambda w: w.astype(jnp.float16) * x * jnp.float16(1e-4)  # d loss / dw = 1e-8
  assert float(jax.grad(loss_fn)(w)) == 0.0  # the float16 backward pass underflows
  ls = precision.dynamic_loss_scale(2.0**15)
  scaled = jax.grad(lambda w: precision.scale_loss(loss_fn(w), ls))(w)
  got = precision.unscale_grads(scaled, ls)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), 1e-8, rtol=0.01)


def test_scale_and_unscale_reject_bad_input():
  ls = precision.dynamic_loss_scale()
  with pytest.raises(TypeError, match='loss_scale: expected a DynamicLossScale .*, got float'):
    precision.scale_loss(jnp.float32(1.0), 1024.0)
  with pytest.raises(TypeError, match='loss_scale: expected a DynamicLossScale .*, got dict'):
    precision.unscale_grads({'a': jnp.ones(2)}, {'scale': 2.0})
  with pytest.raises(ValueError, match=r'loss: expected shape \(\) \(a scalar loss\), got \(3,\)'):
    precision.scale_loss(jnp.ones(3), ls)
  with pytest.raises(ValueError, match='loss: expected a floating-point array, got dtype int32'):
    precision.scale_loss(jnp.int32(3), ls)
  expected = r"grads: expected every leaf to be a floating-point array, got int32 at \['b'\]"
  with pytest.raises(ValueError, match=expected):
    precision.unscale_grads({'a': jnp.ones(2), 'b': jnp.arange(2)}, ls)
  bad = ls.replace(scale=jnp.ones(2))
  with pytest.raises(ValueError, match=r'loss_scale: expected scale to be a float32 scalar, got shape \(2,\)'):
    precision.scale_loss(jnp.float32(1.0), bad)


# --- all_finite and count_underflow -----------------------------------------------------------


@pytest.mark.parametrize('bad', [jnp.nan, jnp.inf, -jnp.inf])
def test_all_finite_finds_one_bad_entry_anywhere(bad):
  tree = {'a': jnp.ones(3), 'b': [jnp.zeros((2, 2), jnp.float16), jnp.ones(4, jnp.bfloat16)]}
  check = jax.jit(precision.all_finite)
  assert check(tree).shape == () and check(tree).dtype == jnp.bool_
  assert bool(check(tree))
  for path in [('a',), ('b', 0), ('b', 1)]:
    broken = jax.tree.map(lambda x: x, tree)
    leaf = broken[path[0]] if len(path) == 1 else broken[path[0]][path[1]]
    leaf = leaf.ravel().at[1].set(bad).reshape(leaf.shape)
    if len(path) == 1:
      broken[path[0]] = leaf
    else:
      broken[path[0]][path[1]] = leaf
    assert not bool(check(broken)), path


def test_all_finite_of_an_empty_tree_is_true_and_bad_leaves_are_rejected():
  assert bool(precision.all_finite({}))
  with pytest.raises(ValueError, match=r"tree: expected every leaf to be a floating-point array, got int32 at \['n'\]"):
    precision.all_finite({'x': jnp.ones(2), 'n': jnp.arange(3)})
  with pytest.raises(ValueError, match=r'tree: expected every leaf .*, got str at \[0\]'):
    precision.all_finite(['nan'])


def test_count_underflow_counts_only_entries_lost_in_low_precision():
  reference = {'w': jnp.array([1e-9, 1e-3, 0.0, -1e-10]), 'b': jnp.array([5e-8, 1.0])}
  low = jax.tree.map(lambda x: x.astype(jnp.float16), reference)
  # float16 keeps 1e-3 and 1.0; 1e-9 and -1e-10 round to zero; 5e-8 is near the smallest
  # subnormal (6e-8) and rounds up to it; the exact zero in the reference is not counted.
  assert int(jax.jit(precision.count_underflow)(low, reference)) == 2
  assert int(precision.count_underflow(reference, reference)) == 0


def test_count_underflow_rejects_mismatched_trees():
  a = {'w': jnp.ones(3)}
  with pytest.raises(ValueError, match='reference: expected the same tree structure as values'):
    precision.count_underflow(a, {'v': jnp.ones(3)})
  with pytest.raises(ValueError, match=r"reference\['w'\]: expected shape \(3,\) \(same as values\), got \(4,\)"):
    precision.count_underflow(a, {'w': jnp.ones(4)})
  with pytest.raises(ValueError, match='values: expected every leaf to be a floating-point array'):
    precision.count_underflow({'w': jnp.arange(3)}, a)


# --- param_bytes --------------------------------------------------------------------------------


def test_param_bytes_follows_param_dtype_not_dtype():
  def mlp(**kw):
    return ft.MLP(64, (32,), 10, rngs=nnx.Rngs(0), **kw)
  n = 64 * 32 + 32 + 32 * 10 + 10
  assert precision.param_bytes(mlp()) == 4 * n
  assert precision.param_bytes(mlp(dtype=jnp.bfloat16)) == 4 * n
  assert precision.param_bytes(mlp(param_dtype=jnp.bfloat16)) == 2 * n


def test_param_bytes_ignores_batch_norm_statistics_and_rejects_non_modules():
  model = ft.CNN(rngs=nnx.Rngs(0), batch_norm=True)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  everything = jax.tree.leaves(nnx.state(model))
  assert precision.param_bytes(model) == sum(4 * x.size for x in params)
  assert precision.param_bytes(model) < sum(x.size * x.dtype.itemsize for x in everything)
  with pytest.raises(TypeError, match='model: expected an nnx.Module, got dict'):
    precision.param_bytes({'w': jnp.ones(3)})


@pytest.mark.parametrize('scale', [0.0, -8.0, float('inf'), float('nan'), 0.5])
def test_a_hand_built_loss_scale_with_a_bad_scale_is_named_at_once_or_at_first_use(scale):
  with pytest.raises(ValueError, match=r'DynamicLossScale\.scale: expected a finite float32 number >= min_scale'):
    ft.DynamicLossScale(scale=scale, good_steps=0)  # a host number: checked when built
  with pytest.raises(ValueError, match=r'DynamicLossScale\.scale: .* got 0\.0'):
    ft.dynamic_loss_scale(8.0).replace(scale=0.0)
  built = ft.DynamicLossScale(scale=jnp.float32(scale), good_steps=jnp.int32(0))  # an array: checked at first use
  with pytest.raises(ValueError, match=r'DynamicLossScale\.scale: expected a finite float32 number >= min_scale'):
    ft.scale_loss(jnp.float32(1.0), built)


@pytest.mark.parametrize('field, value, match', [
    ('growth_interval', 0, 'DynamicLossScale.growth_interval: expected a positive int'),
    ('growth_factor', 1.0, 'DynamicLossScale.growth_factor: expected a finite number > 1'),
    ('backoff_factor', 1.5, r'DynamicLossScale.backoff_factor: expected a number in \(0, 1\)'),
    ('min_scale', -1.0, 'DynamicLossScale.min_scale: expected a finite float32 number > 0'),
])
def test_a_hand_built_loss_scale_with_bad_static_fields_is_named_at_first_use(field, value, match):
  built = ft.DynamicLossScale(scale=jnp.float32(8.0), good_steps=jnp.int32(0), **{field: value})
  with pytest.raises(ValueError, match=match):
    ft.scale_loss(jnp.float32(1.0), built)


def test_a_good_loss_scale_still_goes_through_jit():
  loss_scale = ft.dynamic_loss_scale(8.0, growth_interval=1)
  adjusted = jax.jit(ft.adjust_loss_scale)(loss_scale, jnp.bool_(True))
  assert float(adjusted.scale) == 16.0 and adjusted.growth_interval == 1
