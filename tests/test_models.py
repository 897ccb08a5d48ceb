import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxtrain as ft


@pytest.mark.parametrize('input_shape', [(8, 8, 1), (28, 28, 1), (7, 9, 3)])
def test_cnn_flattened_size_follows_the_input_shape(input_shape):
  model = ft.CNN(4, input_shape=input_shape, rngs=nnx.Rngs(0))
  h, w, _ = input_shape
  assert model.dense.in_features == (h // 2) * (w // 2) * 64
  assert model(jnp.ones((2, *input_shape))).shape == (2, 4)


def test_mlp_shapes_and_parameter_count():
  model = ft.MLP(64, (32, 16), 10, rngs=nnx.Rngs(0))
  assert model(jnp.ones((3, 8, 8, 1))).shape == (3, 10)
  want = 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == want


def test_models_are_deterministic_given_the_seed():
  a = ft.CNN(rngs=nnx.Rngs(7))(jnp.ones((1, 8, 8, 1)))
  b = ft.CNN(rngs=nnx.Rngs(7))(jnp.ones((1, 8, 8, 1)))
  c = ft.CNN(rngs=nnx.Rngs(8))(jnp.ones((1, 8, 8, 1)))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_bfloat16_compute_keeps_float32_params():
  model = ft.MLP(64, (8,), 10, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert model.out.kernel[...].dtype == jnp.float32
  assert model(jnp.ones((2, 64))).dtype == jnp.bfloat16


@pytest.mark.parametrize('make, match', [
    (lambda: ft.MLP(64, (0,), 10, rngs=nnx.Rngs(0)), 'hidden: expected a positive int, got 0'),
    (lambda: ft.MLP(64, (8,), 10, dropout_rate=1.0, rngs=nnx.Rngs(0)), r'dropout_rate: expected a value in \[0, 1\)'),
    (lambda: ft.CNN(input_shape=(1, 8, 1), rngs=nnx.Rngs(0)), 'input_shape: expected height and width of at least 2'),
    (lambda: ft.MLP(64, (8,), 10, dtype='fp16', rngs=nnx.Rngs(0)),
     r"dtype: expected None or a floating-point dtype .* got 'fp16' \(did you mean 'float16', i.e. jnp.float16\?\)"),
    (lambda: ft.MLP(64, (8,), 10, param_dtype=None, rngs=nnx.Rngs(0)),
     'param_dtype: expected a floating-point dtype such as jnp.float32, jnp.bfloat16 or jnp.float16 .*got None'),
    (lambda: ft.CNN(dtype=jnp.int8, rngs=nnx.Rngs(0)), 'dtype: expected None or a floating-point dtype'),
])
def test_bad_constructor_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_wrong_input_shape_is_named():
  with pytest.raises(ValueError, match=r'x: expected images of shape \(batch, 8, 8, 1\), got \(2, 28, 28, 1\)'):
    ft.CNN(rngs=nnx.Rngs(0))(jnp.ones((2, 28, 28, 1)))
  with pytest.raises(ValueError, match='x: expected 64 features per example after flattening, got 784'):
    ft.MLP(64, (8,), 10, rngs=nnx.Rngs(0))(jnp.ones((2, 28, 28)))


def test_hidden_as_a_bare_int_is_named():
  with pytest.raises(TypeError, match=r'hidden: expected a sequence of layer widths such as \(32,\), got the int 32'):
    ft.MLP(30, 32, 2, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='hidden: expected a sequence of layer widths'):
    ft.MLP(30, 'wide', 2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('cls, names', [
    (ft.MLP, ['in_features', 'hidden', 'out_features', 'dropout_rate', 'dtype', 'param_dtype', 'rngs']),
    (ft.CNN, ['num_classes', 'input_shape', 'features', 'hidden', 'dropout_rate', 'batch_norm', 'dtype',
              'param_dtype', 'rngs']),
])
def test_help_shows_the_real_signature(cls, names):
  import inspect
  import pydoc
  assert list(inspect.signature(cls).parameters) == names
  header = pydoc.render_doc(cls, renderer=pydoc.plaintext).split('\n\n')[1]  # 'class MLP(...)' and its signature
  assert f'{cls.__name__}({names[0]}: ' in header and '*args' not in header


@pytest.mark.parametrize('dtype', ['bfloat16', jnp.bfloat16, 'float16', None])
def test_dtypes_jnp_accepts_are_accepted(dtype):
  model = ft.MLP(64, (8,), 10, dtype=dtype, rngs=nnx.Rngs(0))
  assert model(jnp.ones((2, 64))).dtype == (jnp.dtype(dtype) if dtype is not None else jnp.float32)


# Built in one compiled call ----------------------------------------------------------------------------


def eager_mlp(seed, hidden, dropout_rate=0.0):
  """The same layers as ft.MLP, built op by op as Flax builds them outside jit."""
  rngs = nnx.Rngs(seed)
  widths = [64, *hidden]
  layers = [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
  dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate else None
  return layers, dropout, nnx.Linear(widths[-1], 10, rngs=rngs), rngs


@pytest.mark.parametrize('dropout_rate', [0.0, 0.3])
def test_models_are_built_in_one_compiled_call_with_the_values_of_an_op_by_op_build(dropout_rate):
  hidden = (24, 40)  # shapes no other test builds: the first build compiles
  with ft.debug.count_compilations() as compiled:
    rngs = nnx.Rngs(5)  # creating Rngs compiles its own small ops: counted apart
  with ft.debug.count_compilations() as compiled:
    model = ft.MLP(64, hidden, 10, dropout_rate=dropout_rate, rngs=rngs)
  assert compiled.names == ['jit(_init)'], compiled.names
  with ft.debug.count_compilations() as compiled:
    ft.MLP(64, hidden, 10, dropout_rate=dropout_rate, rngs=nnx.Rngs(6))  # another seed, the same structure
  assert 'jit(_init)' not in compiled.names

  layers, dropout, out, eager_rngs = eager_mlp(5, hidden, dropout_rate)
  for ours, theirs in zip([*model.hidden, model.out], [*layers, out]):
    np.testing.assert_allclose(ours.kernel[...], theirs.kernel[...], rtol=0, atol=2e-7)
    np.testing.assert_array_equal(ours.bias[...], theirs.bias[...])
  assert not np.array_equal(model.out.kernel[...], ft.MLP(64, hidden, 10, rngs=nnx.Rngs(6)).out.kernel[...])
  # The Rngs advanced as the op-by-op build advanced them, so what is drawn next is the same.
  np.testing.assert_array_equal(jax.random.key_data(rngs.params()), jax.random.key_data(eager_rngs.params()))
  if dropout_rate:
    masks = [np.asarray(d(jnp.ones((4, 40)))) for d in (model.dropout, dropout)]
    np.testing.assert_array_equal(*masks)


def test_a_large_model_is_built_by_an_optimized_program_with_the_same_values(monkeypatch):
  from flaxtrain import models
  small = ft.MLP(64, (48,), 10, rngs=nnx.Rngs(1))
  monkeypatch.setattr(models, '_QUICK_COMPILE_MAX_VALUES', 0)  # every model counts as large
  with ft.debug.count_compilations() as compiled:
    large = ft.MLP(64, (48,), 10, rngs=nnx.Rngs(1))
  assert compiled.names == ['jit(_init)']  # the optimized program: a compilation of its own
  for ours, theirs in zip(jax.tree.leaves(nnx.state(small)), jax.tree.leaves(nnx.state(large))):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-7)
