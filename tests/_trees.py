"""Helpers shared by the checkpoint and loop tests: compare whole states bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def as_numpy(node):
  """Every array of a model's or optimizer's state; PRNG keys as their key data."""
  def leaf(x):
    x = jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    return np.asarray(x)
  return jax.tree.map(leaf, nnx.to_pure_dict(nnx.state(node)))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)
