"""Exercises of notebook 05 (gradient clipping): the global norm and clipping by it, by hand."""

from __future__ import annotations

import jax
import numpy as np
import optax

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


def _grads(scale=1.0, seed=0):
  rng = np.random.default_rng(seed)
  return {'read': {'kernel': (scale * rng.normal(size=(8, 4))).astype(np.float32),
                   'bias': (scale * rng.normal(size=4)).astype(np.float32)},
          'out': {'kernel': (3 * scale * rng.normal(size=(4, 3))).astype(np.float32)}}


def _leaf_norms(grads):
  return [float(np.linalg.norm(g)) for g in jax.tree.leaves(grads)]


def _shapes_hint(error):
  text = str(error)
  if any(s in text for s in ('dimensions', 'shape', 'inhomogeneous', 'sequence')):
    return ('the arrays of the tree have different shapes: sum the squares of each array on its own '
            '(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)), or flatten each one (g.ravel()) before joining them')
  return None


@exercise('05.1', 'the global norm of a tree of gradients',
          'a function global_norm(grads) returning a scalar', solutions.global_norm, on_error=_shapes_hint)
def check_global_norm(answer):
  for seed in (0, 1):
    grads = _grads(seed=seed)
    got = call(answer, grads)
    norms = _leaf_norms(grads)
    compare(got, optax.tree.norm(grads), what='your global norm', at=f'on a tree of 3 arrays (seed {seed})',
            rtol=1e-5, mistakes=[
                (sum(norms), 'that is the sum of the norms of the arrays; the global norm is the square root of '
                             'the sum of the SQUARES of every entry: sqrt(sum of squared norms)'),
                (sum(n ** 2 for n in norms), 'the square root is missing: that is the squared norm'),
                (norms[0], 'only the first array counted: sum over every leaf, jax.tree.leaves(grads)'),
                (max(norms), 'that is the largest norm of one array; the global norm counts every array'),
                (norms[-1], 'only the last array counted: sum over every leaf, jax.tree.leaves(grads)'),
                (float(np.sqrt(np.mean(np.concatenate([np.ravel(g) ** 2 for g in jax.tree.leaves(grads)])))),
                 'that is the root-MEAN-square: the global norm sums the squares, it does not average them'),
            ])
  return 'matches optax.tree.norm on a nested tree.'


@exercise('05.2', 'clip a tree of gradients by its global norm',
          'a function clip_by_global_norm(grads, max_norm) returning a tree like grads',
          solutions.clip_by_global_norm)
def check_clip(answer):
  tx = optax.clip_by_global_norm(1.0)
  for scale, case in ((2.0, 'a gradient of global norm {:.3g}, above max_norm 1'),
                      (0.05, 'a gradient of global norm {:.3g}, below max_norm 1')):
    grads = _grads(scale)
    norm = float(optax.tree.norm(grads))
    expected, _ = tx.update(grads, tx.init(grads))
    got = call(answer, grads, 1.0)
    if jax.tree.structure(got) != jax.tree.structure(grads):
      raise Fail(f'clip_by_global_norm should return a tree of the same structure as grads '
                 f'({jax.tree.structure(grads)}), got {jax.tree.structure(got)}: use jax.tree.map')
    at = 'for ' + case.format(norm)
    for (path, g), e, original in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected),
                                      jax.tree.leaves(grads)):
      name = jax.tree_util.keystr(path)
      leaf_norm = float(np.linalg.norm(original))
      mistakes = [
          (original * min(1.0, 1.0 / leaf_norm), 'each array was clipped by its own norm; clipping by the '
                                                 'GLOBAL norm scales every array by the same factor '
                                                 'max_norm / global_norm, which keeps the direction'),
          (np.clip(original, -1.0, 1.0), 'that clips each value (like optax.clip), which changes the direction '
                                         'of the gradient; scale the whole tree by max_norm / global_norm'),
          (original / norm, 'the gradient was scaled to norm max_norm although it was already shorter: clip only '
                            'when the global norm exceeds max_norm (factor min(1, max_norm / norm))'),
      ]
      compare(g, e, what=f'your clipped {name}', at=at, rtol=1e-5, atol=1e-7, mistakes=mistakes)
  return 'one factor for the whole tree, and gradients below the threshold pass unchanged.'
