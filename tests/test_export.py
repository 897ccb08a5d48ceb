"""flaxtrain.export: inference checkpoints, jax.export files, smaller weights, the predictor."""

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxtrain as ft
from flaxtrain import export

RNG = np.random.default_rng(0)
IMAGES = RNG.normal(size=(7, 8, 8, 1)).astype(np.float32)


def small_cnn(seed=0, **kw):
  kw = {'features': (4, 8), 'hidden': 16, 'batch_norm': True, 'dropout_rate': 0.5, **kw}
  model = ft.CNN(rngs=nnx.Rngs(seed), **kw)
  # Running averages other than BatchNorm's initial (0, 1), so that a model that ignores them fails.
  for norm in (model.norm1, model.norm2):
    norm.mean[...] = jnp.asarray(RNG.normal(size=norm.mean.shape), jnp.float32)
    norm.var[...] = jnp.asarray(RNG.uniform(0.5, 2.0, size=norm.var.shape), jnp.float32)
  return model


def eval_logits(model, images=IMAGES):
  return np.asarray(ft.eval_view(model)(images))


# Inference checkpoints -------------------------------------------------------

def json_file(item_dir):
  """The JSON file orbax wrote for one item of the checkpoint."""
  (file,) = [p for p in item_dir.iterdir() if p.name != 'commit_success.txt']
  return file


def test_weights_round_trip_into_a_fresh_model(tmp_path):
  model = small_cnn(0)
  path = export.save_weights(tmp_path / 'w', model, metadata={'accuracy': 0.5})
  fresh = small_cnn(1)
  assert not np.allclose(eval_logits(fresh), eval_logits(model))
  assert export.load_weights(path, fresh) == {'accuracy': 0.5}
  np.testing.assert_array_equal(eval_logits(fresh), eval_logits(model))


def test_the_checkpoint_holds_params_and_batch_stats_only(tmp_path):
  model = small_cnn(0)
  export.save_weights(tmp_path / 'w', model)
  recorded = json.loads(json_file(tmp_path / 'w' / 'checksums').read_text())
  params_and_stats = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
  assert len(recorded['weights']) == len(jax.tree.leaves(params_and_stats)) == 16
  assert 'norm1/mean' in recorded['weights'] and 'conv1/kernel' in recorded['weights']
  assert not any('rng' in key or 'dropout' in key for key in recorded['weights'])


def test_a_changed_checksum_is_named_and_nothing_is_loaded(tmp_path):
  model, fresh = small_cnn(0), small_cnn(1)
  export.save_weights(tmp_path / 'w', model)
  file = json_file(tmp_path / 'w' / 'checksums')
  recorded = json.loads(file.read_text())
  recorded['weights']['dense/kernel'] = '0' * 64
  file.write_text(json.dumps(recorded))
  before = eval_logits(fresh)
  with pytest.raises(ValueError, match="array 'dense/kernel' .* SHA-256"):
    export.load_weights(tmp_path / 'w', fresh)
  np.testing.assert_array_equal(eval_logits(fresh), before)


def test_edited_metadata_fails_its_checksum(tmp_path):
  export.save_weights(tmp_path / 'w', small_cnn(0), metadata={'accuracy': 0.5})
  file = json_file(tmp_path / 'w' / 'metadata')
  file.write_text(json.dumps({'accuracy': 0.99}))
  with pytest.raises(ValueError, match='metadata .* checksum'):
    export.load_weights(tmp_path / 'w', small_cnn(1))


def test_another_architecture_is_refused_naming_the_variable(tmp_path):
  export.save_weights(tmp_path / 'w', small_cnn(0))
  with pytest.raises(ValueError, match=r"model: expected .*'conv1/bias' is \(\(4,\), 'float32'\) .* there and \(\(5,\), 'float32'\) in the model"):
    export.load_weights(tmp_path / 'w', small_cnn(0, features=(5, 8)))


def test_weights_bad_inputs(tmp_path):
  model = small_cnn(0)
  with pytest.raises(TypeError, match=r'directory: expected a path \(str or os.PathLike\), got int 3'):
    export.save_weights(3, model)
  with pytest.raises(TypeError, match='model: expected an nnx.Module, got dict'):
    export.save_weights(tmp_path / 'w', {})
  with pytest.raises(TypeError, match='metadata: expected a JSON-serialisable dict'):
    export.save_weights(tmp_path / 'w', model, metadata={'x': object()})
  with pytest.raises(ValueError, match='model: expected a model with nnx.Param'):
    export.save_weights(tmp_path / 'w', nnx.Module())
  export.save_weights(tmp_path / 'w', model)
  with pytest.raises(FileExistsError, match='directory: expected a path that does not exist yet'):
    export.save_weights(tmp_path / 'w', model)
  with pytest.raises(FileNotFoundError, match='directory: expected an inference checkpoint .*does not exist'):
    export.load_weights(tmp_path / 'missing', model)
  with pytest.raises(FileNotFoundError, match='holds none'):
    export.load_weights(tmp_path, model)
  with pytest.raises(TypeError, match='model: expected an nnx.Module, got str'):
    export.load_weights(tmp_path / 'w', 'model')


# Smaller weights ---------------------------------------------------------------

def test_quantize_int8_matches_numpy_per_output_channel():
  kernel = RNG.normal(size=(3, 3, 4, 6)).astype(np.float32)
  kernel[..., 2] *= 100.0                                     # one channel 100x larger: its own scale
  kernel[..., 5] = 0.0                                        # an all-zero channel
  q, scale = jax.jit(export.quantize_int8)(jnp.asarray(kernel))
  amax = np.abs(kernel).max(axis=(0, 1, 2), keepdims=True)
  want_scale = np.where(amax > 0, amax / 127, 1.0)
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  np.testing.assert_array_equal(q, np.clip(np.round(kernel / want_scale), -127, 127).astype(np.int8))
  assert q.dtype == jnp.int8 and scale.shape == (1, 1, 1, 6)
  assert np.abs(q).max() == 127 and not np.any(q[..., 5])
  back = export.dequantize_int8(q, scale)
  assert back.dtype == jnp.float32
  assert np.all(np.abs(back - kernel) <= np.asarray(scale) / 2 + 1e-6)


@pytest.mark.parametrize('kernel, fragment', [
    (np.ones(4, np.float32), r'kernel: expected a floating-point array of at least 2 dimensions, got shape \(4,\)'),
    (np.ones((2, 2), np.int32), 'got shape \\(2, 2\\) and dtype int32'),
])
def test_quantize_int8_bad_input(kernel, fragment):
  with pytest.raises(ValueError, match=fragment):
    export.quantize_int8(kernel)
  with pytest.raises(TypeError, match='kernel: expected an array, got list'):
    export.quantize_int8([[1.0]])


def test_dequantize_int8_bad_input():
  q = jnp.zeros((2, 3), jnp.int8)
  with pytest.raises(ValueError, match='q: expected an int8 array, got float32'):
    export.dequantize_int8(q.astype(jnp.float32), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match='scale: expected a floating-point array, got int32'):
    export.dequantize_int8(q, jnp.ones((1, 3), jnp.int32))
  with pytest.raises(ValueError, match=r'scale: expected a shape that broadcasts against q\(2, 3\), got \(1, 4\)'):
    export.dequantize_int8(q, jnp.ones((1, 4)))


def test_inference_model_sizes_and_outputs():
  model = small_cnn(0)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  stats = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  kernels = [x for x in params if x.ndim >= 2]
  full = export.inference_model(model)
  assert full.nbytes == sum(x.nbytes for x in params) + stats
  assert export.inference_model(model, 'bfloat16').nbytes == sum(x.size * 2 for x in params) + stats
  int8 = export.inference_model(model, 'int8')
  small = sum(x.nbytes for x in params if x.ndim < 2)
  assert int8.nbytes == sum(x.size + 4 * x.shape[-1] for x in kernels) + small + stats
  np.testing.assert_allclose(full(IMAGES), eval_logits(model), rtol=1e-5, atol=1e-5)
  rounded = model
  for name in ('conv1', 'conv2', 'dense', 'out'):  # the int8 model computes with the dequantized kernels
    layer = getattr(rounded, name)
    layer.kernel[...] = export.dequantize_int8(*export.quantize_int8(layer.kernel[...]))
  np.testing.assert_allclose(int8(IMAGES), eval_logits(rounded), rtol=1e-5, atol=1e-5)


def test_inference_model_bad_input():
  with pytest.raises(ValueError, match="weights: expected 'float32', 'bfloat16' or 'int8', got 'int4'"):
    export.inference_model(small_cnn(), 'int4')
  with pytest.raises(ValueError, match=r'input_shape: expected a tuple of positive ints .*got \(8, 0\)'):
    export.inference_model(small_cnn(), input_shape=(8, 0))
  with pytest.raises(TypeError, match='model: expected an nnx.Module, got NoneType'):
    export.inference_model(None)
  with pytest.raises(TypeError, match='x: expected an array, got list'):
    export.inference_model(small_cnn())([[1.0]])


# jax.export and the predictor ---------------------------------------------------

def test_export_has_a_symbolic_batch_and_matches_the_model(tmp_path):
  model = small_cnn(0)
  exported = export.export_model(model, tmp_path / 'm.jaxexport')
  (aval,) = exported.in_avals
  assert not isinstance(aval.shape[0], int) and aval.shape[1:] == (8, 8, 1)
  assert exported.platforms == (jax.default_backend(),)
  predict = export.load(tmp_path / 'm.jaxexport')
  for n in (1, 3, 7):  # any batch size, one file
    logits = predict(IMAGES[:n])
    assert isinstance(logits, np.ndarray) and logits.shape == (n, 10)
    np.testing.assert_allclose(logits, eval_logits(model, IMAGES[:n]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(predict.classes(IMAGES), predict(IMAGES).argmax(-1))


def test_export_of_int8_weights_is_smaller_and_predicts_like_the_int8_model(tmp_path):
  model = ft.CNN(rngs=nnx.Rngs(0))
  export.export_model(model, tmp_path / 'f32')
  int8 = export.inference_model(model, 'int8')
  export.export_model(int8, tmp_path / 'i8')
  assert (tmp_path / 'i8').stat().st_size < 0.35 * (tmp_path / 'f32').stat().st_size
  np.testing.assert_allclose(export.load(tmp_path / 'i8')(IMAGES), int8(IMAGES), rtol=1e-5, atol=1e-5)


FRESH_PROCESS = textwrap.dedent('''
    import sys
    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))
    np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
    print(sorted(m for m in ('flax', 'flaxtrain', 'optax', 'orbax') if m in sys.modules))
''')


def test_a_fresh_process_with_jax_and_numpy_only_reproduces_the_logits(tmp_path):
  export.export_model(small_cnn(0), tmp_path / 'm.jaxexport')
  np.save(tmp_path / 'x.npy', IMAGES)
  run = subprocess.run([sys.executable, '-c', FRESH_PROCESS, str(tmp_path / 'm.jaxexport'),
                        str(tmp_path / 'x.npy'), str(tmp_path / 'y.npy')],
                       capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == '[]'                        # no flax, flaxtrain, optax or orbax imported
  np.testing.assert_array_equal(np.load(tmp_path / 'y.npy'), export.load(tmp_path / 'm.jaxexport')(IMAGES))


def test_predictor_refuses_bad_batches(tmp_path):
  export.export_model(small_cnn(0), tmp_path / 'm.jaxexport')
  predict = export.load(tmp_path / 'm.jaxexport')
  with pytest.raises(ValueError, match=r'batch: expected shape \(batch, 8, 8, 1\), got \(7, 8, 8\)'):
    predict(IMAGES[..., 0])
  with pytest.raises(ValueError, match=r'batch: expected shape \(batch, 8, 8, 1\), got \(2, 28, 28, 1\)'):
    predict(np.zeros((2, 28, 28, 1), np.float32))
  with pytest.raises(ValueError, match=r'batch: expected at least 1 example .*got \(0, 8, 8, 1\)'):
    predict(IMAGES[:0])
  with pytest.raises(ValueError, match=r'batch: expected dtype float32, got float64 \(convert with batch.astype'):
    predict(IMAGES.astype(np.float64))
  with pytest.raises(TypeError, match=r"batch: expected an array of examples, got a dict .*pass batch\['image'\]"):
    predict({'image': IMAGES})
  with pytest.raises(TypeError, match='batch: expected a NumPy or JAX array, got list'):
    predict(IMAGES.tolist())


def test_load_and_export_bad_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match='path: expected a file written by ft.export.export_model, .*does not exist'):
    export.load(tmp_path / 'missing.jaxexport')
  with pytest.raises(FileNotFoundError, match='is a directory'):
    export.load(tmp_path)
  (tmp_path / 'notes.txt').write_text('not a model')
  with pytest.raises(ValueError, match='not a serialized jax.export artifact'):
    export.load(tmp_path / 'notes.txt')
  with pytest.raises(TypeError, match='path: expected a path'):
    export.load(None)
  model = small_cnn(0)
  with pytest.raises(TypeError, match='model: expected an nnx.Module or an ft.export.InferenceModel, got function'):
    export.export_model(lambda x: x, tmp_path / 'm')
  with pytest.raises(FileNotFoundError, match='path: expected a file in an existing directory'):
    export.export_model(model, tmp_path / 'no' / 'm')
  with pytest.raises(IsADirectoryError, match='path: expected a file name, got the directory'):
    export.export_model(model, tmp_path)
  with pytest.raises(TypeError, match="dtype: expected a dtype such as jnp.float32, got 'pixels'"):
    export.export_model(model, tmp_path / 'm', dtype='pixels')
  with pytest.raises(ValueError, match="platforms: expected a tuple of platform names .*got 'cpu'"):
    export.export_model(model, tmp_path / 'm', platforms='cpu')
  with pytest.raises(ValueError, match='input_shape: expected the shape of one example'):
    export.export_model(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), tmp_path / 'm')
  assert not list(tmp_path.glob('m*')) and not list(tmp_path.glob('.m*'))   # nothing half-written


def test_export_of_a_model_without_input_shape(tmp_path):
  linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  export.export_model(linear, tmp_path / 'lin', input_shape=(3,))
  x = np.ones((4, 3), np.float32)
  np.testing.assert_allclose(export.load(tmp_path / 'lin')(x), linear(x), rtol=1e-6)
  assert repr(export.load(tmp_path / 'lin')) == "Predictor('lin', input float32[b, 3], platforms ('cpu',))"


def test_load_refuses_exports_it_cannot_check(tmp_path):
  f32 = jax.numpy.float32
  two_symbols = jax.export.export(jax.jit(lambda x: x.sum(1)))(jax.ShapeDtypeStruct(jax.export.symbolic_shape('b, n'), f32))
  (tmp_path / 'two').write_bytes(two_symbols.serialize())
  with pytest.raises(ValueError, match=r'path: expected an export whose only symbolic dimension is the batch, got input float32\[b,n\]'):
    export.load(tmp_path / 'two')
  two_inputs = jax.export.export(jax.jit(lambda x, y: x + y))(*[jax.ShapeDtypeStruct((2,), f32)] * 2)
  (tmp_path / 'pair').write_bytes(two_inputs.serialize())
  with pytest.raises(ValueError, match='path: expected an export with one input and one output, got 2 and 1'):
    export.load(tmp_path / 'pair')
