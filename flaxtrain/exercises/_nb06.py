"""Exercises of notebook 06 (mixed precision): unscaling with a finite check, dynamic loss scaling."""

from __future__ import annotations

import jax
import numpy as np

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise

# Where the check plants a bad value: the first, a middle (nested) and the last leaf of the tree, in
# jax.tree_util order (dict keys sorted): ['decoder'][0]['kernel'] ... ['out'].
_FIRST, _MIDDLE, _LAST = "['decoder'][0]['kernel']", "['encoder']['bias']", "['out']"
_CASES = [  # (what is planted, where, value)
    ('finite gradients', None, None),
    (f'an inf in the first leaf, grads{_FIRST}', _FIRST, np.inf),
    (f'a NaN in a middle leaf, grads{_MIDDLE}', _MIDDLE, np.nan),
    (f'a -inf in the last leaf, grads{_LAST}', _LAST, -np.inf),
    (f'a NaN in the first leaf, grads{_FIRST}', _FIRST, np.nan),
    (f'an inf in a middle leaf, grads{_MIDDLE}', _MIDDLE, np.inf),
    (f'a NaN in the last leaf, grads{_LAST}', _LAST, np.nan),
]


def _scaled(where=None, value=None):
  """A nested tree of gradients multiplied by a loss scale of 1024, with ``value`` planted at ``where``."""
  rng = np.random.default_rng(0)
  scaled = lambda *shape: (rng.normal(size=shape) * 1024).astype(np.float32)
  tree = {'decoder': [{'kernel': scaled(3, 4)}, {'kernel': scaled(4, 2)}],
          'encoder': {'bias': scaled(4), 'kernel': scaled(5, 4)},
          'out': scaled(2)}
  if where is not None:
    leaf = {_FIRST: tree['decoder'][0]['kernel'], _MIDDLE: tree['encoder']['bias'], _LAST: tree['out']}[where]
    leaf.reshape(-1)[1] = value
  return tree


def _finite_hint(got: list[bool]) -> str:
  """The usual cause of a wrong pattern of ``finite`` over _CASES (True = the learner said finite)."""
  says = dict(zip(((where, repr(value)) for _, where, value in _CASES), got))
  caught = lambda where, value: not says[(where, repr(value))]
  nan_only = all(caught(w, v) == (v is not None and np.isnan(v)) for _, w, v in _CASES[1:])
  if nan_only:
    return ('an inf is not finite either: test with jnp.isfinite, which is False for inf, -inf and NaN, not '
            'jnp.isnan')
  for where, name in ((_LAST, 'the last'), (_FIRST, 'the first')):
    if all(caught(w, v) == (w == where) for _, w, v in _CASES[1:]):
      return (f'only {name} leaf is looked at: a bad value anywhere in the tree must make finite False; reduce '
              'over every leaf, e.g. all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads))')
  if not any(caught(w, v) for _, w, v in _CASES[1:]):
    return 'finite is True whatever the gradients hold: it must be False as soon as one entry is inf or NaN'
  return 'look at every entry of every leaf with jnp.isfinite, and combine them with jnp.all'


def _non_scalar_hint(error):
  text = str(error)
  if 'inhomogeneous' in text or 'setting an array element with a sequence' in text or 'same shape' in text:
    return ('the leaves have different shapes, so they cannot be put in one array as they are: reduce each leaf '
            'to one boolean first (jnp.all(jnp.isfinite(g))), then combine those')
  return None


@exercise('06.1', 'unscale the gradients of a scaled loss and check that they are finite',
          'a function unscale_and_check(scaled_grads, loss_scale) returning (grads, finite)',
          solutions.unscale_and_check, on_error=_non_scalar_hint)
def check_unscale(answer):
  said = []
  for case, where, value in _CASES:
    scaled = _scaled(where, value)
    result = call(answer, scaled, 1024.0)
    if not isinstance(result, tuple) or len(result) != 2:
      raise Fail('unscale_and_check should return a pair (grads, finite)')
    grads, finite = result
    if jax.tree.structure(grads) != jax.tree.structure(scaled):
      raise Fail('the gradients should come back as a tree of the same structure: use jax.tree.map')
    for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(scaled)):
      name = jax.tree_util.keystr(path)
      compare(got, expected / 1024.0, what=f'grads{name}', at=f'with {case}, loss scale 1024', rtol=1e-6, mistakes=[
          (expected * 1024.0, 'you multiplied by the loss scale: the loss was multiplied by it, so the gradients '
                              'must be divided')])
    if np.shape(finite) != () or np.asarray(finite).dtype != np.bool_:
      raise Fail(f'finite should be one boolean (a scalar, e.g. from jnp.all), but it has shape {np.shape(finite)} '
                 f'and dtype {np.asarray(finite).dtype}')
    said.append(bool(finite))
  expected = [where is None for _, where, _ in _CASES]
  if said != expected:
    index = next(i for i, (got, want) in enumerate(zip(said, expected)) if got != want)
    hint = 'every entry is finite here, so finite must be True' if expected[index] else _finite_hint(said)
    raise Fail(f'with {_CASES[index][0]} your finite is {said[index]}, but it should be {expected[index]}: {hint}')
  return ('unscaled by division, and finite is False for an inf or a NaN in the first, a middle or the last leaf '
          'of a nested tree.')


@exercise('06.2', 'one update of a dynamic loss scale',
          'a function next_loss_scale(scale, good_steps, finite, growth_interval) returning (scale, good_steps)',
          solutions.next_loss_scale)
def check_next_loss_scale(answer):
  # A run of steps: (finite?) flags, starting from scale 1024 with growth_interval 3.
  flags = [True, True, True, True, False, True, True, False, False, True, True, True]
  scale, good = 1024.0, 0
  for step, finite in enumerate(flags):
    expected_scale, expected_good = solutions.next_loss_scale(scale, good, finite, 3)
    result = call(answer, scale, good, finite, 3)
    if not isinstance(result, tuple) or len(result) != 2:
      raise Fail('next_loss_scale should return a pair (scale, good_steps)')
    got_scale, got_good = float(np.asarray(result[0])), int(np.asarray(result[1]))
    at = (f'at step {step} (scale {scale:g}, good_steps {good}, finite={finite}, growth_interval 3)')
    if finite and got_scale == scale * 2 and good + 1 < 3:
      raise Fail(f'{at}: your scale grew to {got_scale:g}, but it should grow only after growth_interval finite '
                 'steps in a row')
    if finite and good + 1 == 3 and got_scale == scale:
      raise Fail(f'{at}: this is the 3rd finite step in a row, so the scale should double to {scale * 2:g} '
                 'and good_steps restart at 0 (grow when good_steps + 1 reaches growth_interval)')
    compare(got_scale, expected_scale, what='your scale', at=at, mistakes=[
        (scale, 'after a non-finite step the scale must shrink (halve), or the next step overflows again')])
    if not finite:
      mistakes = [(good, 'after a non-finite step good_steps must restart at 0')]
    elif expected_good == 0:
      mistakes = [(good + 1, 'after the scale grows, good_steps restarts at 0')]
    else:
      mistakes = [(good, 'a finite step should add one to good_steps')]
    compare(got_good, expected_good, what='your good_steps', at=at, atol=0, mistakes=mistakes)
    scale, good = got_scale, got_good
  return 'halves on overflow, doubles after 3 finite steps in a row, and counts correctly over 12 steps.'
