"""Exercises of notebook 06 (mixed precision): unscaling with a finite check, dynamic loss scaling."""

from __future__ import annotations

import jax
import numpy as np

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


def _scaled(bad=None):
  rng = np.random.default_rng(0)
  tree = {'hidden': rng.normal(size=(4, 3)).astype(np.float32) * 1024,
          'out': rng.normal(size=3).astype(np.float32) * 1024}
  if bad is not None:
    tree['out'][1] = bad
  return tree


@exercise('06.1', 'unscale the gradients of a scaled loss and check that they are finite',
          'a function unscale_and_check(scaled_grads, loss_scale) returning (grads, finite)',
          solutions.unscale_and_check)
def check_unscale(answer):
  for bad, case in ((None, 'finite gradients'), (np.inf, "an inf in grads['out']"),
                    (np.nan, "a NaN in grads['out']")):
    scaled = _scaled(bad)
    result = call(answer, scaled, 1024.0)
    if not isinstance(result, tuple) or len(result) != 2:
      raise Fail('unscale_and_check should return a pair (grads, finite)')
    grads, finite = result
    if jax.tree.structure(grads) != jax.tree.structure(scaled):
      raise Fail('the gradients should come back as a tree of the same structure: use jax.tree.map')
    for key in ('hidden', 'out'):
      compare(grads[key], scaled[key] / 1024.0, what=f"grads['{key}']", at=f'with {case}, loss scale 1024',
              rtol=1e-6, mistakes=[(scaled[key] * 1024.0, 'you multiplied by the loss scale: the loss was '
                                                          'multiplied by it, so the gradients must be divided')])
    expected = bad is None
    if np.shape(finite) != () or np.asarray(finite).dtype != np.bool_:
      raise Fail(f'finite should be a boolean scalar (jnp.all(...)), but it has shape {np.shape(finite)} and '
                 f'dtype {np.asarray(finite).dtype}')
    if bool(finite) != expected:
      hint = {'finite gradients': 'every entry is finite here',
              "an inf in grads['out']": 'an inf is not finite: test with jnp.isfinite (which catches inf and NaN), '
                                        'not jnp.isnan, and look at every leaf, not only the first',
              "a NaN in grads['out']": 'a NaN is not finite: test every leaf with jnp.isfinite'}[case]
      raise Fail(f'with {case} your finite is {bool(finite)}, but it should be {expected}: {hint}')
  return 'unscaled by division, and finite is False as soon as any leaf holds an inf or a NaN.'


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
