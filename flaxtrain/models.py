"""Small reference models shared by the notebooks and tests.

``dtype`` is the computation dtype and ``param_dtype`` the storage dtype of
the weights, as in every NNX layer; mixed precision keeps float32 weights and
computes in bfloat16.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxtrain import checks

__all__ = ['MLP', 'CNN', 'TransformerLM']


_DTYPE_ALIASES = {'bf16': 'bfloat16', 'fp16': 'float16', 'f16': 'float16', 'half': 'float16',
                  'fp32': 'float32', 'f32': 'float32', 'fp64': 'float64', 'f64': 'float64'}


def _check_dtype(name: str, dtype: Any, *, optional: bool) -> None:
  """Raises, naming ``name``, unless ``dtype`` is a floating-point dtype (or None if ``optional``)."""
  if dtype is None and optional:
    return
  try:
    ok = dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)  # jnp.dtype(None) is float
  except TypeError:
    ok = False
  if not ok:
    hint = f" (did you mean '{_DTYPE_ALIASES[dtype]}', i.e. jnp.{_DTYPE_ALIASES[dtype]}?)" if (
        isinstance(dtype, str) and dtype in _DTYPE_ALIASES) else ''
    allowed = 'None or ' if optional else ''
    raise ValueError(
        f"{name}: expected {allowed}a floating-point dtype such as jnp.float32, jnp.bfloat16 or jnp.float16 "
        f"(or 'float32', 'bfloat16', 'float16'), got {dtype!r}{hint}"
    )


def _with_init_signature(cls: type) -> type:
  """Makes ``help(cls)`` and ``inspect.signature(cls)`` show ``__init__``'s arguments.

  ``nnx.Module``'s metaclass defines ``__call__(*args, **kwargs)``, which
  ``inspect`` would report instead.
  """
  signature = inspect.signature(cls.__init__)
  cls.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
  return cls


def _check_widths(name: str, widths: object) -> tuple[int, ...]:
  """A sequence of positive ints, e.g. ``(128, 128)``; a bare int is refused, naming the fix."""
  if isinstance(widths, numbers.Integral) and not isinstance(widths, bool):
    raise TypeError(f'{name}: expected a sequence of layer widths such as ({widths},), got the int {widths}')
  if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
    raise TypeError(f'{name}: expected a sequence of layer widths such as (128, 128), got {widths!r:.60}')
  return tuple(checks.check_int(name, width) for width in widths)


def _make(rngs: nnx.Rngs, layers: Any) -> list[nnx.Module]:
  return [cls(*args, **dict(kwargs), rngs=rngs) for cls, args, kwargs in layers]


def _init(rng_state: Any, *, rng_graphdef: Any, layers: Any) -> tuple[Any, Any]:
  """Builds ``layers`` from a copy of the Rngs; returns the layers' state and the Rngs' new state."""
  rngs = nnx.merge(rng_graphdef, rng_state)
  return nnx.state(_make(rngs, layers)), nnx.state(rngs)


# The initializers run once per model, so for a small model the compile time is what a learner waits for.
# Measured on the CPU backend: XLA's backend optimizations cost about 0.5 s on the small MLP (Flax's
# truncated-normal initializer) and save nothing that matters below a few million values; above that the
# optimized program is several times faster to run (33M values: 1.6 s unoptimized, 0.4 s optimized plus
# 0.5 s more compile time). Not measured on accelerators, so there the program is always optimized.
_QUICK_COMPILE_MAX_VALUES = 1 << 23
_init_quick = jax.jit(_init, static_argnames=('rng_graphdef', 'layers'),
                      compiler_options={'xla_backend_optimization_level': 0})
_init_optimized = jax.jit(_init, static_argnames=('rng_graphdef', 'layers'))


def built(rngs: nnx.Rngs, *layers: tuple[type, Sequence[Any], dict[str, Any]]) -> list[nnx.Module]:
  """``[cls(*args, **kwargs, rngs=rngs) for cls, args, kwargs in layers]``, built in one compiled call.

  Outside ``jit``, Flax's initializers run op by op, and every new shape of an
  operation is one XLA compilation: 16 of them, over a second, for the small
  MLP in a fresh process. Here the layers are traced once without running
  (``jax.eval_shape``, for their structure), then their values are computed
  by one ``jax.jit`` program, compiled once per list of layers; on the CPU,
  up to 8M values, it is compiled without XLA's backend optimizations,
  which take longer to apply than the program takes to run. ``rngs``
  advances as in the op-by-op build and the same random bits are drawn; the
  initial values match the op-by-op build to float rounding (a unit in the
  last place), not always to the bit.

  Args:
    rngs: the ``nnx.Rngs`` every layer draws from, in order.
    layers: ``(cls, args, kwargs)`` triples; the arguments must be hashable
      (ints, tuples, strings, dtypes), since they select the compiled program.

  Returns:
    The layers, in order.
  """
  specs = tuple((cls, tuple(args), tuple(sorted(kwargs.items()))) for cls, args, kwargs in layers)
  rng_graphdef, rng_state = nnx.split(rngs)
  graphdefs = []

  def structure(rng_state: Any) -> Any:  # traced only: the layers' GraphDef and shapes
    graphdef, state = nnx.split(_make(nnx.merge(rng_graphdef, rng_state), specs))
    graphdefs.append(graphdef)
    return state

  values = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(structure, rng_state)))
  quick = values <= _QUICK_COMPILE_MAX_VALUES and jax.default_backend() == 'cpu'
  init = _init_quick if quick else _init_optimized
  state, rng_state = init(rng_state, rng_graphdef=rng_graphdef, layers=specs)
  nnx.update(rngs, rng_state)
  return nnx.merge(graphdefs[0], state)


def _check_dropout_rate(rate: float) -> None:
  checks.check_real('dropout_rate', rate, expected='a value in [0, 1)', valid=lambda v: 0.0 <= v < 1.0)


@_with_init_signature
class MLP(nnx.Module):
  """Flattens its input, then Linear -> ReLU [-> Dropout] layers -> logits.

  Args:
    in_features: size of one flattened input (64 for an 8x8 digit).
    hidden: widths of the hidden layers, e.g. ``(128, 128)``.
    out_features: number of outputs (classes).
    dropout_rate: Dropout after each hidden layer (0 disables it).
    rngs: ``nnx.Rngs(seed)``; Dropout draws from its default stream.

  Example:
    >>> model = MLP(64, (32,), 10, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((5, 8, 8, 1))).shape
    (5, 10)
  """

  def __init__(
      self,
      in_features: int,
      hidden: Sequence[int],
      out_features: int,
      *,
      dropout_rate: float = 0.0,
      dtype: jnp.dtype | None = None,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    checks.check_int('in_features', in_features)
    checks.check_int('out_features', out_features)
    _check_dtype('dtype', dtype, optional=True)
    _check_dtype('param_dtype', param_dtype, optional=False)
    hidden = _check_widths('hidden', hidden)
    _check_dropout_rate(dropout_rate)
    self.in_features = in_features
    widths = [in_features, *hidden]
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    layers = built(rngs, *[(nnx.Linear, (a, b), kw) for a, b in zip(widths[:-1], widths[1:])],
                   *([(nnx.Dropout, (dropout_rate,), {})] if dropout_rate else []),
                   (nnx.Linear, (widths[-1], out_features), kw))
    self.hidden = nnx.List(layers[:len(hidden)])
    self.dropout = layers[len(hidden)] if dropout_rate else None
    self.out = layers[-1]

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != self.in_features:
      raise ValueError(
          f'x: expected {self.in_features} features per example after flattening, got {x.shape[1]}'
      )
    for layer in self.hidden:
      x = nnx.relu(layer(x))
      if self.dropout is not None:
        x = self.dropout(x)
    return self.out(x)


@_with_init_signature
class CNN(nnx.Module):
  """Two 3x3 convolutions, one 2x2 average pool, two dense layers.

  Sized for 8x8 digits but works for any ``(height, width, channels)``: the
  flattened size after pooling is computed from ``input_shape``.

  Args:
    num_classes: number of logits.
    input_shape: ``(height, width, channels)`` of one image.
    features: channels of the two convolutions.
    hidden: width of the dense layer.
    dropout_rate: Dropout before the last layer (0 disables it).
    batch_norm: add BatchNorm after each convolution.
    rngs: ``nnx.Rngs(seed)``.

  Example:
    >>> model = CNN(rngs=nnx.Rngs(0))
    >>> model(jnp.ones((5, 8, 8, 1))).shape
    (5, 10)
  """

  def __init__(
      self,
      num_classes: int = 10,
      *,
      input_shape: tuple[int, int, int] = (8, 8, 1),
      features: tuple[int, int] = (32, 64),
      hidden: int = 128,
      dropout_rate: float = 0.0,
      batch_norm: bool = False,
      dtype: jnp.dtype | None = None,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    _check_dtype('dtype', dtype, optional=True)
    _check_dtype('param_dtype', param_dtype, optional=False)
    height, width, channels = input_shape
    if height < 2 or width < 2:
      raise ValueError(f'input_shape: expected height and width of at least 2, got {input_shape}')
    _check_dropout_rate(dropout_rate)
    self.input_shape = tuple(input_shape)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    conv = dict(kw, padding='SAME')
    flat = (height // 2) * (width // 2) * features[1]  # 'SAME' convs keep H, W; the pool halves them
    layers = iter(built(rngs, (nnx.Conv, (channels, features[0], (3, 3)), conv),
                        (nnx.Conv, (features[0], features[1], (3, 3)), conv),
                        *([(nnx.BatchNorm, (features[0],), kw), (nnx.BatchNorm, (features[1],), kw)] if batch_norm else []),
                        (nnx.Linear, (flat, hidden), kw),
                        *([(nnx.Dropout, (dropout_rate,), {})] if dropout_rate else []),
                        (nnx.Linear, (hidden, num_classes), kw)))
    self.conv1, self.conv2 = next(layers), next(layers)
    self.norm1, self.norm2 = (next(layers), next(layers)) if batch_norm else (None, None)
    self.dense = next(layers)
    self.dropout = next(layers) if dropout_rate else None
    self.out = next(layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    if tuple(x.shape[1:]) != self.input_shape:
      raise ValueError(f'x: expected images of shape (batch, {", ".join(map(str, self.input_shape))}), got {x.shape}')
    x = self.conv1(x)
    x = nnx.relu(self.norm1(x) if self.norm1 is not None else x)
    x = self.conv2(x)
    x = nnx.relu(self.norm2(x) if self.norm2 is not None else x)
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
    if self.dropout is not None:
      x = self.dropout(x)
    return self.out(x)


class _DecoderBlock(nnx.Module):
  """Pre-LN block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, d_model: int, num_heads: int, mlp_ratio: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = nnx.LayerNorm(d_model, **kw)
    self.attention = nnx.MultiHeadAttention(num_heads, d_model, decode=False, keep_rngs=False, **kw)
    self.norm2 = nnx.LayerNorm(d_model, **kw)
    self.mlp_in = nnx.Linear(d_model, mlp_ratio * d_model, **kw)
    self.mlp_out = nnx.Linear(mlp_ratio * d_model, d_model, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class TransformerLM(nnx.Module):
  """A decoder-only transformer: tokens ``(batch, length)`` -> next-token logits.

  Token and learned position embeddings, ``num_layers`` pre-LN blocks (causal
  multi-head self-attention, then a GELU MLP, each added to its input), a final
  LayerNorm and a linear head. Position ``t`` of the output depends only on
  tokens ``0..t``: the attention mask hides every later token.

  Args:
    vocab_size: number of tokens (characters).
    context: the longest input the model accepts (position embeddings).
    d_model: width of the residual stream; divisible by ``num_heads``.
    num_heads: attention heads per block.
    num_layers: blocks.
    mlp_ratio: hidden width of the MLP, as a multiple of ``d_model``.
    rngs: ``nnx.Rngs(seed)``.

  Example:
    >>> model = TransformerLM(65, context=32, d_model=32, num_heads=4, num_layers=1, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 10), jnp.int32)).shape
    (2, 10, 65)
  """

  def __init__(
      self,
      vocab_size: int,
      *,
      context: int,
      d_model: int = 64,
      num_heads: int = 4,
      num_layers: int = 2,
      mlp_ratio: int = 4,
      dtype: jnp.dtype | None = None,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    for name, value in (('vocab_size', vocab_size), ('context', context), ('d_model', d_model),
                        ('num_heads', num_heads), ('num_layers', num_layers), ('mlp_ratio', mlp_ratio)):
      checks.check_int(name, value)
    if d_model % num_heads:
      raise ValueError(f'd_model: expected a multiple of num_heads ({num_heads}), got {d_model}')
    _check_dtype('dtype', dtype, optional=True)
    _check_dtype('param_dtype', param_dtype, optional=False)
    self.vocab_size, self.context = vocab_size, context
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    layers = built(rngs, (nnx.Embed, (vocab_size, d_model), kw), (nnx.Embed, (context, d_model), kw),
                   *[(_DecoderBlock, (d_model, num_heads, mlp_ratio), kw)] * num_layers,
                   (nnx.LayerNorm, (d_model,), kw), (nnx.Linear, (d_model, vocab_size), kw))
    self.token_embed, self.position_embed = layers[:2]
    self.blocks = nnx.List(layers[2:-2])
    self.norm, self.head = layers[-2:]

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.integer):
      raise ValueError(f'tokens: expected integer token ids of shape (batch, length), got '
                       f'{jnp.asarray(tokens).dtype} shape {jnp.shape(tokens)}')
    length = tokens.shape[1]
    if not 1 <= length <= self.context:
      raise ValueError(f'tokens: expected a length in [1, {self.context}] (the model\'s context), got {length}')
    if not isinstance(tokens, jax.core.Tracer):  # values are known outside jit: check them
      low, high = int(jnp.min(tokens)), int(jnp.max(tokens))
      if low < 0 or high >= self.vocab_size:
        raise ValueError(f'tokens: expected ids in [0, {self.vocab_size}) (vocab_size), got values in [{low}, {high}]')
    x = self.token_embed(tokens) + self.position_embed(jnp.arange(length))[None]
    mask = nnx.make_causal_mask(tokens, dtype=jnp.bool_)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))
