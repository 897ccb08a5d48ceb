"""Exercises of notebook 12 (best practices): a seeded split, counting correct answers exactly."""

from __future__ import annotations

import math

import numpy as np

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


def _indices(answer, n, fraction, seed):
  result = call(answer, n, fraction, seed)
  if not isinstance(result, tuple) or len(result) != 2:
    raise Fail('split_indices should return a pair (train_indices, val_indices)')
  return tuple(np.asarray(part) for part in result)


@exercise('12.1', 'a seeded, shuffled train/validation split',
          'a function split_indices(n, val_fraction, seed) returning (train_indices, val_indices)',
          solutions.split_indices)
def check_split_indices(answer):
  # 48 * 0.2 = 9.6 and 47 * 0.2 = 9.4: round, int (truncation) and math.ceil give different sizes.
  for n, fraction in ((50, 0.2), (48, 0.2), (47, 0.2)):
    train, val = _indices(answer, n, fraction, 0)
    at = f'for n={n}, val_fraction={fraction}, seed 0'
    num_val = round(n * fraction)
    if len(val) != num_val or len(train) != n - num_val:
      sizes = f'your split has {len(train)} training and {len(val)} validation indices; it should have ' \
              f'{n - num_val} and {num_val}'
      if len(val) == int(n * fraction) and len(train) == n - len(val):
        raise Fail(f'{at}: {sizes}: int() truncates {n * fraction:g} to {int(n * fraction)}; use '
                   'round(n * val_fraction)')
      if len(val) == math.ceil(n * fraction) and len(train) == n - len(val):
        raise Fail(f'{at}: {sizes}: math.ceil rounds {n * fraction:g} up to {math.ceil(n * fraction)}; use '
                   'round(n * val_fraction)')
      if len(train) == num_val and len(val) == n - num_val:
        raise Fail(f'{at}: {sizes}: the two parts are swapped; the validation part is the small one')
      raise Fail(f'{at}: {sizes}')
    both = np.concatenate([train, val])
    if len(set(both.tolist()) & set(range(n))) != n or len(both) != n:
      overlap = sorted(set(train.tolist()) & set(val.tolist()))[:5]
      raise Fail(f'{at}: every index 0..{n - 1} should appear exactly once in the two parts'
                 + (f'; {overlap} are in both (draw a permutation, not indices with replacement)' if overlap else ''))
    if np.array_equal(np.sort(val), np.arange(n - len(val), n)) or np.array_equal(np.sort(val), np.arange(len(val))):
      raise Fail(f'{at}: your validation indices are a block at one end of the data ({np.sort(val)[:3]}...); '
                 'shuffle first (np.random.default_rng(seed).permutation(n)), since data files are often sorted')
  n, fraction = 50, 0.2
  at = f'for n={n}, val_fraction={fraction}, seed 0'
  train, val = _indices(answer, n, fraction, 0)
  again_train, again_val = _indices(answer, n, fraction, 0)
  if not (np.array_equal(train, again_train) and np.array_equal(val, again_val)):
    raise Fail(f'{at}: a second call with the same seed gave a different split; draw from '
               'np.random.default_rng(seed), not from the global random state')
  other_train, other_val = _indices(answer, n, fraction, 1)
  if np.array_equal(np.sort(val), np.sort(other_val)):
    raise Fail(f'for n={n}: seeds 0 and 1 gave the same validation set; the seed should choose the shuffle')
  return ('the right sizes (rounded, for three n), disjoint, shuffled, the same for the same seed and different for '
          'another.')


def _argmax_hint(error):
  if 'shape' in str(error) or 'broadcast' in str(error):
    return ('the predicted class is the argmax over the classes, the last axis: jnp.argmax(logits, axis=-1) has '
            'shape (batch,), like labels')
  return None


@exercise('12.2', 'count the correct predictions of a padded batch exactly',
          'a function count_correct(logits, labels, mask) returning an int', solutions.count_correct,
          on_error=_argmax_hint)
def check_count_correct(answer):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(10, 4)).astype(np.float32)
  labels = np.argmax(logits, axis=-1).astype(np.int32)
  labels[[1, 4]] = (labels[[1, 4]] + 1) % 4          # two real examples wrong
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], np.float32)   # the last 3 are padding (and all "correct")
  got = call(answer, logits, labels, mask)
  correct = np.argmax(logits, -1) == labels
  at = 'for 7 real examples (2 wrong) and 3 padded ones'
  compare(got, solutions.count_correct(logits, labels, mask), what='your count', at=at, atol=0, mistakes=[
      (int(correct.sum()), 'the padded rows were counted: only rows with mask 1 are examples'),
      (float(correct[:7].mean()), 'that is the accuracy; return the count, so that counts from many batches add up '
                                  'exactly'),
      (int((~correct & (mask > 0)).sum()), 'that is the number of WRONG real examples: count argmax == label'),
  ])
  value = got if isinstance(got, (bool, int, float, np.generic)) else np.asarray(got)
  dtype = np.asarray(value).dtype
  if isinstance(got, bool) or dtype == np.bool_ or np.shape(value) != () or not np.issubdtype(dtype, np.integer):
    raise Fail(f'{at}: your count has the right value but it is a {type(got).__name__} of dtype {dtype}, not an '
               'integer: a float count (5.0) is exact only up to 2**24 in float32, so counts summed over a '
               'large dataset drift. Count booleans and return int(jnp.sum(...))')
  return 'counts the real examples only, as an exact integer.'
