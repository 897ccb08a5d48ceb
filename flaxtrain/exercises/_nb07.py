"""Exercises of notebook 07 (debugging training): where the NaNs are, how many ReLUs are dead."""

from __future__ import annotations

import jax
import numpy as np

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, exercise


def _tree(inf_at=None, nan_at=None):
  rng = np.random.default_rng(0)
  tree = {'layers': [{'kernel': rng.normal(size=(3, 2)).astype(np.float32),
                      'bias': rng.normal(size=2).astype(np.float32)} for _ in range(2)],
          'out': {'kernel': rng.normal(size=(2, 2)).astype(np.float32)}}
  for where, value in ((inf_at, np.inf), (nan_at, np.nan)):
    if where is not None:
      leaf = tree['out']['kernel'] if where == 'out' else tree['layers'][where]['kernel']
      leaf[1, 0] = value
  return tree


@exercise('07.1', 'find the leaves of a tree that hold a NaN or an inf',
          'a function nonfinite_paths(tree) returning a list of jax.tree_util.keystr paths',
          solutions.nonfinite_paths)
def check_nonfinite_paths(answer):
  cases = [('no NaN or inf', {}), ("a NaN in ['layers'][1]['kernel']", {'nan_at': 1}),
           ("an inf in ['out']['kernel']", {'inf_at': 'out'}),
           ("an inf in ['layers'][0]['kernel'] and a NaN in ['out']['kernel']", {'inf_at': 0, 'nan_at': 'out'})]
  for case, where in cases:
    tree = _tree(**where)
    expected = solutions.nonfinite_paths(tree)
    got = call(answer, tree)
    if isinstance(got, (list, tuple)) and got and not all(isinstance(p, str) for p in got) and all(
        isinstance(p, tuple) for p in got):
      raise Fail(f'with {case}: you returned the paths as tuples of keys ({got[0]!r:.60}); turn each into a string '
                 'with jax.tree_util.keystr(path)')
    if not isinstance(got, (list, tuple)) or not all(isinstance(p, str) for p in got):
      raise Fail(f'nonfinite_paths should return a list of strings (jax.tree_util.keystr(path)), got {got!r:.100}')
    got = list(got)
    if got == expected:
      continue
    if set(got) == set(expected):
      raise Fail(f'with {case}: the paths are right but in another order ({got}); keep the order of '
                 'jax.tree_util.tree_leaves_with_path')
    missing = [p for p in expected if p not in got]
    extra = [p for p in got if p not in expected]
    if got == [str(p) for p, leaf in jax.tree_util.tree_leaves_with_path(tree) if not np.all(np.isfinite(leaf))]:
      raise Fail(f'with {case}: you returned {got}: str(path) prints the key objects; '
                 'jax.tree_util.keystr(path) gives the path as it is written in Python, e.g. "[\'out\'][\'kernel\']"')
    if got == expected[:1] and len(expected) > 1:
      raise Fail(f'with {case}: you returned only the first path, {got}; return every leaf that holds a NaN or an inf '
                 f'({expected})')
    only_nan = solutions.nonfinite_paths(_tree(nan_at=where.get('nan_at')))
    if got == only_nan and 'inf' in case:
      raise Fail(f'with {case}: you found {got} but missed {missing}, which holds an inf: test with jnp.isfinite '
                 '(NaN and inf), not jnp.isnan')
    raise Fail(f'with {case}: you returned {got}, but the answer is {expected}'
               + (f'; {extra} hold only finite numbers' if extra else '')
               + (f'; {missing} hold a NaN or an inf' if missing else ''))
  return 'finds NaN and inf anywhere in a nested tree, in tree order, and nothing in a finite tree.'


@exercise('07.2', 'the fraction of dead ReLU units in a batch',
          'a function dead_fraction(pre_activations) returning a float', solutions.dead_fraction)
def check_dead_fraction(answer):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8)).astype(np.float32)
  x[:, 0] = -np.abs(x[:, 0]) - 0.1        # dead: negative for every example
  x[:, 1] = 0.0                           # dead: ReLU(0) = 0 and its gradient is 0
  x[:, 2] = -np.abs(x[:, 2]) - 0.1
  x[3, 2] = 0.5                           # alive: one example switches it on
  x[:, 3] = np.abs(x[:, 3]) + 0.1         # alive for every example
  got = call(answer, x)
  try:
    got = float(got)
  except (TypeError, ValueError):
    raise Fail(f'dead_fraction should return one number, got {type(got).__name__} of shape {np.shape(got)}')
  expected = solutions.dead_fraction(x)
  if abs(got - expected) <= 1e-6:
    return 'a unit is dead when its input is <= 0 for every example of the batch.'
  hints = [
      (float(np.mean(x <= 0)), 'that is the fraction of ENTRIES <= 0; a unit (a column) is dead only if it is '
                               '<= 0 for every example (row): jnp.all(x <= 0, axis=0)'),
      (float(np.mean(np.all(x < 0, axis=0))), 'a unit whose input is exactly 0 is dead too (ReLU(0) = 0, and its '
                                              'gradient there is 0): test x <= 0, not x < 0'),
      (float(np.mean(np.any(x <= 0, axis=0))), 'a unit is dead only if NO example switches it on: use jnp.all over '
                                               'the batch axis, not jnp.any'),
      (float(np.mean(np.all(x <= 0, axis=1))), 'the batch is axis 0 and the units are axis 1: reduce over axis 0'),
  ]
  for wrong, hint in hints:
    if abs(got - wrong) <= 1e-6:
      raise Fail(f'on a batch of 6 examples and 8 units your fraction is {got:.4g}, but it should be '
                 f'{expected:.4g}: {hint}')
  raise Fail(f'on a batch of 6 examples and 8 units your fraction is {got:.4g}, but it should be {expected:.4g}')
