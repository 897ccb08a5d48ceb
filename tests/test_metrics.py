import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxtrain as ft


@pytest.mark.parametrize('use_mask', [False, True])
def test_accuracy_matches_numpy(use_mask):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=50).astype(np.int32)
  mask = (rng.random(50) > 0.3).astype(np.float32) if use_mask else None
  correct = logits.argmax(-1) == labels
  want = correct[mask == 1].mean() if use_mask else correct.mean()
  np.testing.assert_allclose(jax.jit(ft.accuracy)(logits, labels, mask), want, rtol=1e-6)


def test_accuracy_rejects_float_labels():
  with pytest.raises(ValueError, match='labels: expected an integer array'):
    ft.accuracy(jnp.zeros((3, 2)), jnp.zeros(3))
