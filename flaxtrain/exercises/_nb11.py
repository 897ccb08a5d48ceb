"""Exercises of notebook 11 (a small transformer): the causal mask, next-token inputs and targets."""

from __future__ import annotations

import numpy as np
from flax import nnx

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


@exercise('11.1', 'a causal attention mask', 'a function causal_mask(length) returning a bool (length, length) array',
          solutions.causal_mask)
def check_causal_mask(answer):
  for length in (5, 1):   # 5 first: at length 1 several mistakes coincide
    got = np.asarray(call(answer, length))
    expected = np.asarray(solutions.causal_mask(length))
    if got.shape == expected.shape and got.dtype != np.bool_ and not np.isin(got, (0, 1)).all():
      raise Fail(f'causal_mask should hold True/False (or 1/0), got values {np.unique(got)[:4]}')
    compare(got.astype(bool) if got.dtype != np.bool_ and got.shape == expected.shape else got, expected,
            what='your mask', at=f'for length {length}', index_names=('query', 'key'), mistakes=[
                (expected.T, 'the mask is transposed: row q (a query) may see columns k <= q, so it is lower '
                             'triangular; yours lets position 0 see position 1'),
                (np.tril(np.ones((length, length), bool), -1), 'the diagonal is False: each position may attend to '
                                                               'itself (k <= q, not k < q)'),
                (~expected, 'the mask is inverted: True marks the keys a query MAY attend to (k <= q), not the '
                            'future positions it must not see'),
                (np.ones((length, length), bool), 'every position sees every other, the future included: keep only '
                                                  'k <= q (jnp.tril, or positions[None, :] <= positions[:, None])'),
            ])
  # The same mask as Flax's helper, in Flax's layout (batch, heads, query, key).
  flax_mask = np.asarray(nnx.make_causal_mask(np.zeros((1, 5)), dtype=bool))[0, 0]
  np.testing.assert_array_equal(np.asarray(solutions.causal_mask(5)), flax_mask)
  return 'lower triangular with the diagonal: position q sees 0..q, as nnx.make_causal_mask.'


@exercise('11.2', 'inputs and targets for next-token prediction',
          'a function inputs_and_targets(tokens) returning (inputs, targets)', solutions.inputs_and_targets)
def check_inputs_and_targets(answer):
  tokens = np.arange(2 * 7, dtype=np.int32).reshape(2, 7) % 11
  result = call(answer, tokens)
  if not isinstance(result, tuple) or len(result) != 2:
    raise Fail('inputs_and_targets should return a pair (inputs, targets)')
  inputs, targets = (np.asarray(x) for x in result)
  expected_inputs, expected_targets = (np.asarray(x) for x in solutions.inputs_and_targets(tokens))
  at = 'for tokens of shape (2, 7)'
  if inputs.shape == expected_inputs.shape and np.array_equal(inputs, expected_targets) \
      and np.array_equal(targets, expected_inputs):
    raise Fail(f'{at}: inputs and targets are swapped: the model reads tokens[:, :-1] and predicts the NEXT '
               'token, tokens[:, 1:]')
  if np.array_equal(inputs, targets):
    raise Fail(f'{at}: your targets equal your inputs, so the model would learn to copy its input; the target at '
               'position t is the token at t + 1')
  if inputs.shape == (tokens.shape[0] - 1, tokens.shape[1]):
    raise Fail(f'{at}: your inputs have shape {inputs.shape}: you shifted along the batch (axis 0); shift along the '
               'positions (axis 1): tokens[:, :-1] and tokens[:, 1:]')
  if inputs.shape == tokens.shape and np.array_equal(targets, np.roll(tokens, -1, axis=1)):
    raise Fail(f'{at}: np.roll wraps the first token around to the end, so the last target is not the next token '
               'but the first one; slice instead: tokens[:, :-1] and tokens[:, 1:] (one position shorter)')
  compare(inputs, expected_inputs, what='your inputs', at=at, index_names=('row', 'position'))
  compare(targets, expected_targets, what='your targets', at=at, index_names=('row', 'position'))
  return 'targets are the inputs shifted by one: position t predicts token t + 1.'
