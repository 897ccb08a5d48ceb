"""From a trained model to predictions elsewhere (notebook 13).

Two ways to keep a trained model for inference, and smaller weights:

* :func:`save_weights` / :func:`load_weights`: an inference-only checkpoint,
  the parameters and BatchNorm statistics without optimizer or RNG state,
  written by orbax with a SHA-256 checksum of every array (as
  :class:`flaxtrain.Checkpoints` does) and verified before anything is
  loaded. Loading needs the model's class: it fills a fresh model in place.
* :func:`export_model` / :func:`load`: the evaluation-mode forward pass,
  exported with ``jax.export`` for any batch size (a symbolic batch
  dimension) and serialized to one file that holds the computation and the
  weights. :func:`load` reads it back into a :class:`Predictor`,
  ``ft.export.load(path)(images) -> logits``, which checks the shape and
  dtype of every batch. The file itself needs only jax and numpy:
  ``jax.export.deserialize(data).call(images)``.
* :func:`inference_model`: the forward pass with float32, bfloat16 or int8
  weights (int8: symmetric, one scale per output channel, dequantized in the
  forward pass), measured with :attr:`InferenceModel.nbytes` and exportable
  like a model.

Example::

    ft.export.save_weights('runs/cnn-weights', model)
    ft.export.export_model(model, 'runs/cnn.jaxexport')
    predict = ft.export.load('runs/cnn.jaxexport')
    logits = predict(splits.test['image'])          # (360, 10) NumPy array
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flaxtrain.checkpoint import CheckpointError

__all__ = [
    'InferenceModel',
    'Predictor',
    'dequantize_int8',
    'export_model',
    'inference_model',
    'load',
    'load_weights',
    'quantize_int8',
    'save_weights',
]

WEIGHTS = (nnx.Param, nnx.BatchStat)  # what an inference checkpoint holds
WeightsDtype = Literal['float32', 'bfloat16', 'int8']


# Inference checkpoints -------------------------------------------------------

def _check_path(name: str, path: Any) -> pathlib.Path:
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f'{name}: expected a path (str or os.PathLike), got {type(path).__name__} {path!r:.60}')
  return pathlib.Path(path).expanduser().resolve()


def _check_model(model: Any) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')


def _weights(model: nnx.Module) -> dict[str, Any]:
  """Parameters and BatchNorm statistics as nested dicts of arrays."""
  return nnx.to_pure_dict(nnx.state(model, WEIGHTS))


def _flat(tree: Any) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path): x for path, x in flat}


def _sha256(array: Any) -> str:
  """SHA-256 of an array's dtype, shape and bytes (the same recipe as flaxtrain.Checkpoints)."""
  array = np.ascontiguousarray(jax.device_get(array))
  digest = hashlib.sha256(f'{array.dtype.str}{array.shape}'.encode())
  digest.update(array.tobytes())
  return digest.hexdigest()


def _json_sha256(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      weights=ocp.StandardCheckpointHandler(), metadata=ocp.JsonCheckpointHandler(),
      checksums=ocp.JsonCheckpointHandler()))


def save_weights(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes an inference-only checkpoint of ``model``: its weights, nothing else.

  It holds every ``nnx.Param`` and ``nnx.BatchStat`` (BatchNorm's running
  averages), with a SHA-256 checksum of each array and of ``metadata``; no
  optimizer state, no RNG state. orbax writes into a temporary directory and
  renames it once complete, so a crash never leaves a half-written
  checkpoint under ``directory``.

  Args:
    directory: a directory that does not exist yet (nothing is overwritten).
    model: the trained model.
    metadata: a JSON-serialisable dict stored beside the weights (for
      example the accuracy or the training run it came from).

  Returns:
    The checkpoint's directory, complete on return.

  Raises:
    FileExistsError: ``directory`` already exists.
    CheckpointError: orbax could not write it (its error is the cause).

  Example:
    >>> ft.export.save_weights('runs/cnn-weights', model, metadata={'accuracy': 0.98})  # doctest: +SKIP
  """
  directory = _check_path('directory', directory)
  _check_model(model)
  metadata = dict(metadata or {})
  try:
    json.dumps(metadata)
  except (TypeError, ValueError) as error:
    raise TypeError(f'metadata: expected a JSON-serialisable dict ({error})') from error
  if directory.exists():
    raise FileExistsError(f'directory: expected a path that does not exist yet, got the existing {directory}')
  weights = _weights(model)
  if not jax.tree.leaves(weights):
    raise ValueError(f'model: expected a model with nnx.Param or nnx.BatchStat variables, got {type(model).__name__} with none')
  checksums = {'weights': {k: _sha256(x) for k, x in _flat(weights).items()}, 'metadata': _json_sha256(metadata)}
  args = ocp.args.Composite(weights=ocp.args.StandardSave(weights), metadata=ocp.args.JsonSave(metadata),
                            checksums=ocp.args.JsonSave(checksums))
  try:
    with _checkpointer() as checkpointer:
      checkpointer.save(directory, args=args)
  except Exception as error:  # orbax and tensorstore raise many kinds
    raise CheckpointError(f'directory: cannot write the weights to {directory} ({type(error).__name__}: {error})') from error
  return directory


def load_weights(directory: str | os.PathLike[str], model: nnx.Module) -> dict[str, Any]:
  """Loads an inference checkpoint written by :func:`save_weights` into ``model``, in place.

  The stored arrays are checked against ``model`` first (the same variables
  with the same shapes and dtypes) and their SHA-256 checksums verified
  before anything is loaded; a mismatch names the array. ``model`` keeps its
  mode: call ``model.eval()`` (or use :func:`flaxtrain.eval_view`) before
  predicting, so that Dropout is off and BatchNorm uses the loaded averages.

  Args:
    directory: a directory written by :func:`save_weights`.
    model: a fresh model of the same architecture.

  Returns:
    The ``metadata`` dict given to :func:`save_weights`.

  Raises:
    FileNotFoundError: there is no checkpoint at ``directory``.
    ValueError: it does not fit ``model``, or an array or the metadata does
      not match its checksum.

  Example:
    >>> model = ft.CNN(batch_norm=True, rngs=nnx.Rngs(0))           # doctest: +SKIP
    >>> metadata = ft.export.load_weights('runs/cnn-weights', model)  # doctest: +SKIP
    >>> model.eval()                                                  # doctest: +SKIP
  """
  directory = _check_path('directory', directory)
  _check_model(model)
  if not (directory / 'weights').is_dir() or not (directory / 'checksums').is_dir():
    raise FileNotFoundError(f'directory: expected an inference checkpoint written by save_weights, '
                            f'got {directory}, which ' + ('holds none' if directory.exists() else 'does not exist'))
  target = _weights(model)
  with _checkpointer() as checkpointer:
    stored = checkpointer.metadata(directory).item_metadata['weights'].tree
    want = {k: (tuple(x.shape), str(x.dtype)) for k, x in _flat(target).items()}
    have = {k: (tuple(x.shape), str(x.dtype)) for k, x in _flat(stored).items()}
    for key in sorted(set(want) | set(have)):
      if want.get(key) != have.get(key):
        raise ValueError(
            f'model: expected a model whose weights match the checkpoint at {directory}, but {key!r} is '
            f'{have.get(key, "missing")} (shape, dtype) there and {want.get(key, "missing")} in the model; '
            'was it saved from a different architecture?')
    restored = checkpointer.restore(directory, args=ocp.args.Composite(
        weights=ocp.args.StandardRestore(target), metadata=ocp.args.JsonRestore(),
        checksums=ocp.args.JsonRestore()))
  recorded = restored['checksums']
  if recorded.get('metadata') != _json_sha256(restored['metadata']):
    raise ValueError(f'directory: the metadata at {directory} does not match its recorded SHA-256 checksum')
  for key, array in _flat(restored['weights']).items():
    if recorded['weights'].get(key) != _sha256(array):
      raise ValueError(f'directory: array {key!r} at {directory} does not match the SHA-256 checksum '
                       'recorded when it was saved (its bytes changed on disk)')
  state = nnx.state(model, WEIGHTS)
  nnx.replace_by_pure_dict(state, restored['weights'])
  nnx.update(model, state)
  return dict(restored['metadata'] or {})


# Smaller weights -------------------------------------------------------------

def quantize_int8(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 quantization with one scale per output channel (the last axis).

  ``scale = max|kernel| / 127`` over every axis but the last, and
  ``q = round(kernel / scale)`` in ``[-127, 127]``; :func:`dequantize_int8`
  gives ``q * scale`` back, within half a step (``scale / 2``) of ``kernel``.
  A channel of zeros gets scale 1 (and zeros).

  Args:
    kernel: a floating-point array of at least 2 dimensions (a Dense kernel
      ``(in, out)`` or a convolution kernel ``(h, w, in, out)``).

  Returns:
    ``(q, scale)``: ``q`` int8 of ``kernel``'s shape, ``scale`` float32 of
    shape ``(1, ..., 1, out)``.

  Example:
    >>> q, scale = quantize_int8(jnp.array([[0.5, -2.0], [-1.0, 1.0]]))
    >>> q.tolist(), scale.ravel().tolist()
    ([[64, -127], [-127, 64]], [0.007874015718698502, 0.015748031437397003])
  """
  if not hasattr(kernel, 'shape') or not hasattr(kernel, 'dtype'):
    raise TypeError(f'kernel: expected an array, got {type(kernel).__name__}')
  if kernel.ndim < 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f'kernel: expected a floating-point array of at least 2 dimensions, '
                     f'got shape {tuple(kernel.shape)} and dtype {kernel.dtype}')
  kernel = jnp.asarray(kernel, jnp.float32)
  amax = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)), keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array) -> jax.Array:
  """``q * scale`` in float32: the kernel :func:`quantize_int8` approximated.

  Args:
    q: the int8 array.
    scale: float scales that broadcast against ``q`` (one per output channel).

  Returns:
    A float32 array of ``q``'s shape.

  Example:
    >>> dequantize_int8(*quantize_int8(jnp.array([[0.5, -2.0]]))).tolist()
    [[0.5, -2.0]]
  """
  if not hasattr(q, 'dtype') or q.dtype != jnp.int8:
    raise ValueError(f'q: expected an int8 array, got {getattr(q, "dtype", type(q).__name__)}')
  if not hasattr(scale, 'dtype') or not jnp.issubdtype(scale.dtype, jnp.floating):
    raise ValueError(f'scale: expected a floating-point array, got {getattr(scale, "dtype", type(scale).__name__)}')
  try:
    np.broadcast_shapes(q.shape, scale.shape)
  except ValueError as error:
    raise ValueError(f'scale: expected a shape that broadcasts against q{tuple(q.shape)}, got {tuple(scale.shape)}') from error
  return q.astype(jnp.float32) * scale.astype(jnp.float32)


def _compress(x: jax.Array, weights: str) -> Any:
  if weights == 'bfloat16' and jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.bfloat16)
  if weights == 'int8' and x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating):
    return quantize_int8(x)
  return x


def _expand(stored: Any, dtype: Any) -> jax.Array:
  if isinstance(stored, tuple):
    return dequantize_int8(*stored).astype(dtype)
  return stored.astype(dtype)


class InferenceModel:
  """A model's evaluation-mode forward pass, with its weights stored as float32, bfloat16 or int8.

  Built by :func:`inference_model`. The weights are expanded back to their
  original dtype inside the jitted forward pass, so the arithmetic is the
  model's own; only the stored weights shrink.

  Attributes:
    weights: ``'float32'``, ``'bfloat16'`` or ``'int8'``.
    input_shape: the shape of one example, or None if unknown.
    nbytes: bytes of the stored weights and BatchNorm statistics (int8
      kernels with their float32 scales).
  """

  def __init__(self, model: nnx.Module, weights: WeightsDtype, input_shape: tuple[int, ...] | None):
    # evaluation mode, as ft.eval_view: Dropout off, BatchNorm on its running averages
    view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(view, nnx.Param, ...)
    leaves, self._treedef = jax.tree.flatten(params)
    self._dtypes = [x.dtype for x in leaves]
    self._stored = [_compress(x, weights) for x in leaves]
    self._graphdef, self._rest = graphdef, rest
    self.weights, self.input_shape = weights, input_shape
    self.nbytes = int(sum(x.nbytes for x in jax.tree.leaves((self._stored, nnx.state(view, nnx.BatchStat)))))
    self._jitted = jax.jit(self.apply)

  def apply(self, stored: Any, x: jax.Array) -> jax.Array:
    """The forward pass as a pure function of the stored weights (``self.stored``) and a batch."""
    params = jax.tree.unflatten(self._treedef, [_expand(s, d) for s, d in zip(stored, self._dtypes)])
    return nnx.merge(self._graphdef, params, self._rest)(x)

  @property
  def stored(self) -> list[Any]:
    """The stored weights: arrays, or ``(int8, scale)`` pairs for quantized kernels."""
    return self._stored

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits for the batch ``x``, computed with the stored weights."""
    if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
      raise TypeError(f'x: expected an array, got {type(x).__name__}')
    return self._jitted(self._stored, x)

  def __repr__(self) -> str:
    return f'InferenceModel(weights={self.weights!r}, nbytes={self.nbytes})'


def inference_model(
    model: nnx.Module,
    weights: WeightsDtype = 'float32',
    *,
    input_shape: tuple[int, ...] | None = None,
) -> InferenceModel:
  """The evaluation-mode forward pass of ``model``, with smaller weights if asked.

  Args:
    model: a trained model (it is not changed; a copy of its arrays is taken
      in evaluation mode: Dropout off, BatchNorm on its running averages).
    weights: ``'float32'`` (as trained), ``'bfloat16'`` (every parameter
      rounded to bfloat16) or ``'int8'`` (every kernel of 2 or more
      dimensions quantized by :func:`quantize_int8`; biases and BatchNorm
      parameters stay float32). The forward pass computes in float32.
    input_shape: the shape of one example; default ``model.input_shape``
      when the model has it (``ft.CNN`` does).

  Returns:
    An :class:`InferenceModel`: call it on a batch, read ``.nbytes``, or
    pass it to :func:`export_model`.

  Example:
    >>> small = ft.export.inference_model(model, 'int8')   # doctest: +SKIP
    >>> small(images).argmax(-1)                           # doctest: +SKIP
  """
  _check_model(model)
  if weights not in ('float32', 'bfloat16', 'int8'):
    raise ValueError(f"weights: expected 'float32', 'bfloat16' or 'int8', got {weights!r}")
  if input_shape is None:
    input_shape = getattr(model, 'input_shape', None)
  return InferenceModel(model, weights, None if input_shape is None else _check_input_shape(input_shape))


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
  if not (isinstance(input_shape, (tuple, list))
          and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)):
    raise ValueError(f'input_shape: expected a tuple of positive ints (one example), got {input_shape!r}')
  return tuple(input_shape)


# jax.export ------------------------------------------------------------------

def export_model(
    model: nnx.Module | InferenceModel,
    path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, ...] | None = None,
    dtype: Any = jnp.float32,
    platforms: tuple[str, ...] | None = None,
) -> jax.export.Exported:
  """Exports the evaluation-mode forward pass for any batch size and writes it to ``path``.

  The batch dimension is symbolic (``b``, any ``b >= 1``); the example shape
  and dtype are fixed. The weights are constants inside the exported
  computation, so the file is all a process needs:
  ``jax.export.deserialize(open(path, 'rb').read()).call(images)``, with
  jax and numpy only, no flax, no flaxtrain, no model class. The file is
  written to a temporary name and renamed, so it is never half-written.

  Args:
    model: an ``nnx.Module`` (exported in evaluation mode with its float32
      weights) or an :class:`InferenceModel` (with its stored weights).
    path: the file to write (replaced if it exists).
    input_shape: the shape of one example; default ``model.input_shape``.
    dtype: the dtype of the input batch.
    platforms: the platforms to lower for, e.g. ``('cpu', 'cuda')``;
      default the current backend.

  Returns:
    The ``jax.export.Exported`` that was written (``.in_avals``,
    ``.out_avals``, ``.platforms``, ``.mlir_module()``).

  Example:
    >>> exported = ft.export.export_model(model, 'runs/cnn.jaxexport')  # doctest: +SKIP
    >>> exported.in_avals                                               # doctest: +SKIP
    (ShapedArray(float32[b,8,8,1]),)
  """
  if not isinstance(model, (nnx.Module, InferenceModel)):
    raise TypeError(f'model: expected an nnx.Module or an ft.export.InferenceModel, got {type(model).__name__}')
  path = _check_path('path', path)
  if path.is_dir():
    raise IsADirectoryError(f'path: expected a file name, got the directory {path}')
  if not path.parent.is_dir():
    raise FileNotFoundError(f'path: expected a file in an existing directory, got {path}')
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as error:
    raise TypeError(f'dtype: expected a dtype such as jnp.float32, got {dtype!r}') from error
  if platforms is not None and (isinstance(platforms, str) or not all(isinstance(p, str) for p in platforms)):
    raise ValueError(f"platforms: expected a tuple of platform names such as ('cpu', 'cuda'), got {platforms!r}")
  if isinstance(model, nnx.Module):
    model = inference_model(model, input_shape=input_shape)
  shape = model.input_shape if input_shape is None else _check_input_shape(input_shape)
  if shape is None:
    raise ValueError('input_shape: expected the shape of one example (the model has no input_shape), got None')
  stored = model.stored
  forward = jax.jit(lambda x: model.apply(stored, x))
  spec = jax.ShapeDtypeStruct((*jax.export.symbolic_shape('b'), *shape), dtype)
  exported = jax.export.export(forward, platforms=None if platforms is None else tuple(platforms))(spec)
  data = exported.serialize()
  handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  try:
    with os.fdopen(handle, 'wb') as file:
      file.write(data)
    os.replace(temporary, path)
  except BaseException:
    pathlib.Path(temporary).unlink(missing_ok=True)
    raise
  return exported


class Predictor:
  """A model exported by :func:`export_model`, loaded for predictions: ``predictor(images) -> logits``.

  Every batch is checked before it reaches the device: a NumPy or JAX array
  of shape ``(batch, *input_shape)`` with ``batch >= 1`` and exactly the
  exported dtype (no silent casting).

  Attributes:
    exported: the deserialized ``jax.export.Exported``.
    path: the file it was read from.
    input_shape: the shape of one example.
    dtype: the dtype a batch must have.
  """

  def __init__(self, exported: jax.export.Exported, path: pathlib.Path):
    self.exported, self.path = exported, path
    (aval,) = exported.in_avals
    self.input_shape = tuple(int(d) for d in aval.shape[1:])
    self.dtype = np.dtype(aval.dtype)
    self._batch = aval.shape[0] if isinstance(aval.shape[0], int) else None
    self._call = jax.jit(exported.call)

  def __call__(self, batch: np.ndarray | jax.Array) -> np.ndarray:
    """Logits for ``batch`` as a NumPy array of shape ``(batch, num_outputs)``."""
    if isinstance(batch, Mapping):
      raise TypeError(f"batch: expected an array of examples, got a dict with keys {sorted(batch)}; pass batch['image']")
    if not isinstance(batch, (np.ndarray, jax.Array)):
      raise TypeError(f'batch: expected a NumPy or JAX array, got {type(batch).__name__}')
    expected = f'(batch, {", ".join(map(str, self.input_shape))})'
    if tuple(batch.shape[1:]) != self.input_shape or batch.ndim != len(self.input_shape) + 1:
      raise ValueError(f'batch: expected shape {expected}, got {tuple(batch.shape)}')
    if batch.shape[0] < 1 or (self._batch is not None and batch.shape[0] != self._batch):
      wanted = 'at least 1 example' if self._batch is None else f'exactly {self._batch} examples'
      raise ValueError(f'batch: expected {wanted} in shape {expected}, got {tuple(batch.shape)}')
    if batch.dtype != self.dtype:
      raise ValueError(f'batch: expected dtype {self.dtype}, got {batch.dtype} (convert with batch.astype(np.{self.dtype}))')
    return np.asarray(self._call(batch))

  def classes(self, batch: np.ndarray | jax.Array) -> np.ndarray:
    """The predicted class of each example: the index of its largest logit."""
    return np.argmax(self(batch), axis=-1)

  def __repr__(self) -> str:
    shape = ', '.join(map(str, (self._batch or 'b', *self.input_shape)))
    return f'Predictor({self.path.name!r}, input {self.dtype}[{shape}], platforms {self.exported.platforms})'


def load(path: str | os.PathLike[str]) -> Predictor:
  """Reads a model written by :func:`export_model`, ready to predict.

  Args:
    path: the file written by :func:`export_model`.

  Returns:
    A :class:`Predictor`: ``load(path)(images)`` gives the logits.

  Raises:
    FileNotFoundError: there is no file at ``path``.
    ValueError: the file is not a serialized ``jax.export`` artifact, or it
      was not exported for this platform, or not for one input and one
      output, or with a symbolic dimension other than the batch.

  Example:
    >>> predict = ft.export.load('runs/cnn.jaxexport')    # doctest: +SKIP
    >>> predict(splits.test['image']).shape               # doctest: +SKIP
    (360, 10)
  """
  path = _check_path('path', path)
  if not path.is_file():
    raise FileNotFoundError(f'path: expected a file written by ft.export.export_model, got {path}, which '
                            + ('is a directory' if path.is_dir() else 'does not exist'))
  try:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
  except Exception as error:  # flatbuffers raises many kinds on foreign bytes
    raise ValueError(f'path: expected a file written by ft.export.export_model, got {path}, which is not a '
                     f'serialized jax.export artifact ({type(error).__name__})') from error
  backend = jax.default_backend()
  platforms = ('cuda', 'rocm') if backend == 'gpu' else (backend,)
  if not set(platforms) & set(exported.platforms):
    raise ValueError(f'path: expected an export for this backend ({backend}), got one for {exported.platforms}')
  if len(exported.in_avals) != 1 or len(exported.out_avals) != 1:
    raise ValueError(f'path: expected an export with one input and one output, got {len(exported.in_avals)} and '
                     f'{len(exported.out_avals)}')
  if any(not isinstance(d, int) for d in exported.in_avals[0].shape[1:]):
    raise ValueError(f'path: expected an export whose only symbolic dimension is the batch, got input '
                     f'{exported.in_avals[0]}')
  return Predictor(exported, path)
