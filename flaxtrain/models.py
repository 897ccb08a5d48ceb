"""Small reference models shared by the notebooks and tests.

``dtype`` is the computation dtype and ``param_dtype`` the storage dtype of
the weights, as in every NNX layer; mixed precision keeps float32 weights and
computes in bfloat16.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxtrain import _checks

__all__ = ['MLP', 'CNN']


def _check_dropout_rate(rate: float) -> None:
  _checks.check_real('dropout_rate', rate, expected='a value in [0, 1)', valid=lambda v: 0.0 <= v < 1.0)


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
    _checks.check_int('in_features', in_features)
    _checks.check_int('out_features', out_features)
    for width in hidden:
      _checks.check_int('hidden', width)
    _check_dropout_rate(dropout_rate)
    self.in_features = in_features
    widths = [in_features, *hidden]
    self.hidden = nnx.List([
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for a, b in zip(widths[:-1], widths[1:])
    ])
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate else None
    self.out = nnx.Linear(widths[-1], out_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

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
    height, width, channels = input_shape
    if height < 2 or width < 2:
      raise ValueError(f'input_shape: expected height and width of at least 2, got {input_shape}')
    _check_dropout_rate(dropout_rate)
    self.input_shape = tuple(input_shape)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = nnx.Conv(channels, features[0], (3, 3), padding='SAME', **kw)
    self.conv2 = nnx.Conv(features[0], features[1], (3, 3), padding='SAME', **kw)
    self.norm1 = nnx.BatchNorm(features[0], **kw) if batch_norm else None
    self.norm2 = nnx.BatchNorm(features[1], **kw) if batch_norm else None
    flat = (height // 2) * (width // 2) * features[1]  # 'SAME' convs keep H, W; the pool halves them
    self.dense = nnx.Linear(flat, hidden, **kw)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate else None
    self.out = nnx.Linear(hidden, num_classes, **kw)

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
