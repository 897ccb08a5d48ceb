"""Exercises of notebook 13 (from training to predictions): int8 weights by hand, fixed-size prediction batches."""

from __future__ import annotations

import numpy as np

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


def _kernels():
  rng = np.random.default_rng(0)
  conv = rng.normal(size=(3, 3, 2, 4)).astype(np.float32) * np.array([1.0, 0.01, 5.0, 0.2], np.float32)
  conv[..., 3] = 0.0                      # a channel of zeros (pruned, or never trained)
  dense = rng.normal(size=(6, 5)).astype(np.float32)
  dense[2, 1] = 40.0                      # one large weight in one column
  return [('a conv kernel (3, 3, 2, 4) with a channel of zeros', conv), ('a dense kernel (6, 5)', dense)]


@exercise('13.1', 'symmetric int8 weights with one scale per output channel',
          'a function quantize_int8(kernel) returning (q, scale)', solutions.quantize_int8)
def check_quantize_int8(answer):
  for at, kernel in _kernels():
    at = f'for {at}'
    expected_q, expected_scale = (np.asarray(a) for a in solutions.quantize_int8(kernel))
    result = call(answer, kernel)
    if not isinstance(result, tuple) or len(result) != 2:
      raise Fail('quantize_int8 should return a pair (q, scale)')
    q, scale = (np.asarray(a) for a in result)
    channels = kernel.shape[-1]
    if scale.shape == (1,) * (kernel.ndim - 1) + (channels,):   # keepdims=True, as ft.export.quantize_int8
      scale = scale.reshape(channels)
    if scale.shape != (channels,):
      if scale.size == 1:
        raise Fail(f'{at}: your scale is one number for the whole kernel; take one per output channel (the last '
                   f'axis, {channels} of them): max |w| over every other axis, so a channel of small weights is '
                   'not rounded to zero by a large weight elsewhere')
      raise Fail(f'{at}: your scale has shape {scale.shape}; it should have one entry per output channel, shape '
                 f'({channels},): reduce over every axis but the last (axis=tuple(range(kernel.ndim - 1)))')
    if not np.all(np.isfinite(scale)) or not np.all(np.isfinite(np.asarray(q, np.float64))):
      raise Fail(f'{at}: your scale or q holds NaN or inf: a channel of zeros has max |w| = 0, and dividing by a '
                 'scale of 0 gives NaN; give such a channel any positive scale (its q is 0 anyway), e.g. '
                 'jnp.where(amax > 0, amax / 127, 1.0)')
    amax = np.max(np.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
    zero = amax == 0
    compare(np.where(zero, 1.0, scale), expected_scale, what='your scale', at=at, rtol=1e-6, mistakes=[
        (np.where(zero, 1.0, amax / 128), 'the scale is max|w| / 127: q runs over [-127, 127], symmetric, so '
                                          '-128 is never used'),
        (np.where(zero, 1.0, amax), 'the scale maps 127 to max|w|: divide max|w| by 127'),
        (np.where(zero, 1.0, 127 / np.where(zero, 1.0, amax)), 'that is 1 / scale: the scale is max|w| / 127, '
                                                               'and q = round(w / scale)'),
    ], index_names=('channel',))
    if q.dtype != np.int8:
      raise Fail(f'{at}: your q has dtype {q.dtype}; store it as int8 (.astype(jnp.int8)), one byte per weight '
                 'instead of four')
    compare(q, expected_q, what='your q', at=at, atol=0, rtol=0, mistakes=[
        (np.trunc(kernel / expected_scale).astype(np.int8), 'astype(int8) alone truncates towards 0 (0.9 -> 0): '
                                                            'round first, jnp.round(w / scale)'),
        (np.floor(kernel / expected_scale).astype(np.int8), 'floor rounds -0.4 down to -1: use jnp.round'),
    ])
  return 'int8 in [-127, 127] with one scale max|w| / 127 per output channel, and a channel of zeros stays finite.'


def _linear(calls):
  weights = np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32)

  def predict(images):
    images = np.asarray(images)
    calls.append(images.shape)
    return images.reshape(len(images), -1) @ weights
  return predict


@exercise('13.2', 'predictions in batches of one fixed size, the last one padded',
          'a function predict_in_batches(predict, images, batch_size) returning one output per image',
          solutions.predict_in_batches)
def check_predict_in_batches(answer):
  images = np.random.default_rng(2).normal(size=(10, 8, 8, 1)).astype(np.float32)
  expected = _linear([])(images)
  for batch_size in (4, 5, 16):
    at = f'for 10 images in batches of {batch_size}'
    calls = []
    got = call(answer, _linear(calls), images, batch_size)
    sizes = [shape[0] for shape in calls]
    odd = [size for size in sizes if size != batch_size]
    if odd and all(size == 1 for size in sizes):
      raise Fail(f'{at}: predict was called {len(sizes)} times with one image each; call it on batches of '
                 f'{batch_size}, one call per batch (a call has a fixed cost, notebook 13 section 4)')
    if odd:
      raise Fail(f'{at}: predict was called with batches of {sizes}; every call should have exactly '
                 f'{batch_size} rows, so that the program compiles once: pad the last chunk with zeros to '
                 f'{batch_size} rows, then drop the outputs of the padding')
    needed = -(-len(images) // batch_size)
    if len(sizes) != needed:
      raise Fail(f'{at}: predict was called {len(sizes)} times; {needed} calls of {batch_size} rows cover the '
                 '10 images once')
    got = np.asarray(got)
    if len(images) % batch_size and got.shape == (needed * batch_size,) + expected.shape[1:]:
      raise Fail(f'{at}: you returned {got.shape[0]} outputs for 10 images: the outputs of the padding rows were '
                 'kept; keep the first len(chunk) outputs of each call')
    if got.shape[0] == len(images) - len(images) % batch_size and len(images) % batch_size:
      raise Fail(f'{at}: you returned {got.shape[0]} outputs for 10 images: the last, partial batch was dropped; '
                 'every image needs its prediction, so pad it instead')
    compare(got, expected, what='your outputs', at=at, rtol=1e-5, atol=1e-5, index_names=('image', 'class'))
  return 'every call has batch_size rows (one compiled shape), and each image gets its own output, once.'
