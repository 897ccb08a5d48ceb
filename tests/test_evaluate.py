"""evaluate() counts correct predictions exactly, so equal counts tie exactly."""

import jax.numpy as jnp
import numpy as np
import pytest

import flaxtrain as ft


def _fixed_step(rows):
  """An eval_step stand-in that returns the given per-batch metrics in order."""
  rows = iter(rows)

  def eval_step(model, batch):
    return {k: jnp.float32(v) for k, v in next(rows).items()}
  return eval_step


@pytest.mark.parametrize('batch_sizes', [[360], [128, 128, 104], [7] * 51 + [3], [100, 100, 100, 60]])
def test_accuracy_is_correct_over_count_whatever_the_batching(batch_sizes):
  """357 of 360 correct gives exactly 357 / 360, however the set is cut into batches."""
  rows, left = [], 3  # three mistakes, in the first batches
  for size in batch_sizes:
    miss = min(left, size)
    left -= miss
    rows.append({'loss': 0.1, 'accuracy': np.float32((size - miss) / size), 'count': size})
  summary = ft.evaluate(_fixed_step(rows), None, [None] * len(rows))
  assert summary['accuracy'] == 357 / 360
  assert summary['count'] == 360


def test_accuracy_on_a_real_model_equals_the_counted_fraction():
  from flax import nnx
  data = ft.load_digits(seed=0).val
  model = ft.MLP(64, [16], 10, rngs=nnx.Rngs(0))
  loader = ft.DataLoader(data, 50, shuffle=False, remainder='pad')
  summary = ft.evaluate(ft.make_eval_step(), model, loader)
  correct = int(np.sum(np.argmax(np.asarray(model(data['image'])), -1) == data['label']))
  assert summary['accuracy'] == correct / len(data['label'])


def test_non_count_accuracy_falls_back_to_the_weighted_mean():
  rows = [{'accuracy': 0.3, 'count': 2.5}, {'accuracy': 0.6, 'count': 1.5}]
  summary = ft.evaluate(_fixed_step(rows), None, [None, None])
  np.testing.assert_allclose(summary['accuracy'], (0.3 * 2.5 + 0.6 * 1.5) / 4, rtol=1e-6)


def _digits_model():
  from flax import nnx
  return ft.MLP(64, (16,), 10, rngs=nnx.Rngs(0))


def _data(n=40):
  rng = np.random.default_rng(0)
  return {'image': rng.normal(size=(n, 64)).astype(np.float32), 'label': rng.integers(0, 10, n).astype(np.int32)}


def test_evaluate_refuses_a_train_step():
  with pytest.raises(TypeError, match=r'eval_step: expected an eval step from ft.make_eval_step.*got a train step'):
    ft.evaluate(ft.make_train_step(), _digits_model(), [_data()])


def test_evaluate_refuses_a_loader_that_drops_examples():
  loader = ft.DataLoader(_data(40), 16, shuffle=False)  # remainder='drop': 32 of 40
  with pytest.raises(ValueError, match=r"batches: remainder='drop' evaluates only 32 of its 40 examples"):
    ft.evaluate(ft.make_eval_step(), _digits_model(), loader)


def test_evaluate_refuses_a_loss_that_ignores_the_mask():
  def loss_ignoring_mask(model, batch):
    logits = model(batch['image'])
    return ft.softmax_cross_entropy_with_integer_labels(logits, batch['label']), {}

  loader = ft.DataLoader(_data(40), 16, shuffle=False, remainder='pad')
  with pytest.raises(ValueError, match=r"loss_fn: ignores batch\['mask'\]: on a padded batches batch \(8 padding rows\)"):
    ft.evaluate(ft.make_eval_step(loss_ignoring_mask), _digits_model(), loader)
  summary = ft.evaluate(ft.make_eval_step(), _digits_model(), loader)  # the default loss honours it
  assert summary['count'] == 40
