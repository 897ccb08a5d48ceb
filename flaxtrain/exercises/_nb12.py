"""Exercises of notebook 12 (best practices): a seeded split, counting correct answers exactly."""

from __future__ import annotations

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
  n, fraction = 50, 0.2
  train, val = _indices(answer, n, fraction, 0)
  at = f'for n={n}, val_fraction={fraction}, seed 0'
  if len(val) != round(n * fraction) or len(train) != n - round(n * fraction):
    raise Fail(f'{at}: your split has {len(train)} training and {len(val)} validation indices; it should have '
               f'{n - round(n * fraction)} and {round(n * fraction)}')
  both = np.concatenate([train, val])
  if len(set(both.tolist()) & set(range(n))) != n or len(both) != n:
    overlap = sorted(set(train.tolist()) & set(val.tolist()))[:5]
    raise Fail(f'{at}: every index 0..{n - 1} should appear exactly once in the two parts'
               + (f'; {overlap} are in both' if overlap else ''))
  if np.array_equal(np.sort(val), np.arange(n - len(val), n)) or np.array_equal(np.sort(val), np.arange(len(val))):
    raise Fail(f'{at}: your validation indices are a block at one end of the data ({np.sort(val)[:3]}...); '
               'shuffle first (np.random.default_rng(seed).permutation(n)), since data files are often sorted')
  again_train, again_val = _indices(answer, n, fraction, 0)
  if not (np.array_equal(train, again_train) and np.array_equal(val, again_val)):
    raise Fail(f'{at}: a second call with the same seed gave a different split; draw from '
               'np.random.default_rng(seed), not from the global random state')
  other_train, other_val = _indices(answer, n, fraction, 1)
  if np.array_equal(np.sort(val), np.sort(other_val)):
    raise Fail(f'for n={n}: seeds 0 and 1 gave the same validation set; the seed should choose the shuffle')
  return 'the right sizes, disjoint, shuffled, the same for the same seed and different for another.'


@exercise('12.2', 'count the correct predictions of a padded batch exactly',
          'a function count_correct(logits, labels, mask) returning an int', solutions.count_correct)
def check_count_correct(answer):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(10, 4)).astype(np.float32)
  labels = np.argmax(logits, axis=-1).astype(np.int32)
  labels[[1, 4]] = (labels[[1, 4]] + 1) % 4          # two real examples wrong
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], np.float32)   # the last 3 are padding (and all "correct")
  got = call(answer, logits, labels, mask)
  correct = np.argmax(logits, -1) == labels
  compare(got, solutions.count_correct(logits, labels, mask), what='your count',
          at='for 7 real examples (2 wrong) and 3 padded ones', atol=0, mistakes=[
              (int(correct.sum()), 'the padded rows were counted: only rows with mask 1 are examples'),
              (float(correct[:7].mean()), 'that is the accuracy; return the count, so that counts from many '
                                          'batches add up exactly'),
          ])
  return 'counts the real examples only, as an exact integer.'
