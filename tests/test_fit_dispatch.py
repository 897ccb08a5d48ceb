"""fit() with many steps per dispatch and with loss scaling: same results, exact resume, skipped steps.

A tiny MLP with Dropout on 160 digits in batches of 16: 10 steps per epoch,
so stacks of 4 leave a ragged tail of 2 single steps in every epoch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft
from flaxtrain.loop import stack_size
from _trees import as_numpy, assert_trees_equal

STEPS_PER_EPOCH = 10


@pytest.fixture(scope='module')
def digits():
  splits = ft.load_digits(seed=0)
  return {k: v[:160] for k, v in splits.train.items()}


def make_pair(seed=0):
  model = ft.MLP(64, (16,), 10, dropout_rate=0.2, rngs=nnx.Rngs(seed))
  return model, nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)


def run(digits, epochs=2, **kwargs):
  model, optimizer = make_pair()
  history = ft.fit(model, optimizer, ft.DataLoader(digits, 16, seed=1), epochs=epochs, progress=False,
                   log_every=3, best_metric=None, **kwargs)
  return model, optimizer, history


@pytest.mark.parametrize('index, step, every, expected', [
    (0, 0, None, 4), (4, 4, None, 4),
    (8, 8, None, 1),    # 8 + 4 > 10 steps: the tail runs one by one
    (1, 1, None, 1),    # not at a multiple of 4 within the epoch
    (4, 14, 5, 1),      # the checkpoint at step 15 lies inside 14..17
    (4, 16, 20, 4),     # the stack ends exactly at the checkpoint at step 20
])
def test_stacks_start_aligned_and_never_cross_an_epoch_end_or_a_checkpoint(index, step, every, expected):
  assert stack_size(index, step, STEPS_PER_EPOCH, 4, every) == expected


def test_many_steps_per_dispatch_trains_as_single_steps(digits):
  model, optimizer, history = run(digits, steps_per_dispatch=4)
  ref_model, ref_optimizer, ref_history = run(digits)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(ref_model, nnx.Param))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  steps, ref_steps = history.steps(), ref_history.steps()
  np.testing.assert_array_equal(steps['step'], np.arange(2 * STEPS_PER_EPOCH))
  np.testing.assert_allclose(steps['loss'], ref_steps['loss'], rtol=1e-5)
  assert int(optimizer.step[...]) == 2 * STEPS_PER_EPOCH


def test_resuming_with_many_steps_per_dispatch_is_exact(digits, tmp_path):
  kwargs = dict(steps_per_dispatch=4, checkpoint_every=3)
  whole_model, _, whole = run(digits, epochs=2, checkpoint_dir=tmp_path / 'whole', **kwargs)
  model, optimizer = make_pair()
  loader = ft.DataLoader(digits, 16, seed=1)
  common = dict(progress=False, log_every=3, best_metric=None, checkpoint_dir=tmp_path / 'split', **kwargs)
  ft.fit(model, optimizer, loader, epochs=1, **common)
  model, optimizer = make_pair(seed=7)  # restored from the checkpoint
  history = ft.fit(model, optimizer, loader, epochs=2, **common)
  assert_trees_equal(as_numpy(model), as_numpy(whole_model))
  np.testing.assert_array_equal(history.steps()['loss'], whole.steps()['loss'])


def test_fit_rejects_a_bad_steps_per_dispatch(digits):
  model, optimizer = make_pair()
  with pytest.raises(ValueError, match='steps_per_dispatch: expected a positive int, got 0'):
    ft.fit(model, optimizer, ft.DataLoader(digits, 16), epochs=1, steps_per_dispatch=0, progress=False)
  with pytest.raises(TypeError, match='loss_scale: expected a DynamicLossScale'):
    ft.fit(model, optimizer, ft.DataLoader(digits, 16), epochs=1, loss_scale=2.0**15, progress=False)


def overflowing_loss(model, batch):
  """Cross-entropy plus 1e15 * sum(output bias): scaled gradients overflow float32 above a scale of 2**78."""
  loss, aux = ft.classification_loss(model, batch)
  return loss + 1e15 * jnp.sum(model.out.bias[...]), aux


def test_loss_scaled_fit_counts_overflow_steps_and_resumes_exactly(digits, tmp_path):
  def scale():  # starts far too high: the first steps overflow and are skipped
    return ft.dynamic_loss_scale(2.0**80, growth_interval=3)

  common = dict(progress=False, log_every=3, best_metric=None, checkpoint_every=4,
                loss_fn=overflowing_loss)
  model, optimizer = make_pair()
  whole = ft.fit(model, optimizer, ft.DataLoader(digits, 16, seed=1), epochs=2, loss_scale=scale(),
                 checkpoint_dir=tmp_path / 'whole', **common)
  steps = whole.steps()
  skipped = int(np.sum(steps['grads_finite'] == 0.0))
  np.testing.assert_array_equal(steps['grads_finite'][:3], [0.0, 0.0, 1.0])  # 2**80, 2**79 overflow
  np.testing.assert_array_equal(steps['loss_scale'][:3], [2.0**80, 2.0**79, 2.0**78])
  assert int(optimizer.step[...]) == 2 * STEPS_PER_EPOCH - skipped  # skipped steps changed nothing
  assert np.all(np.isfinite(steps['loss']))

  split_model, split_optimizer = make_pair()
  loader = ft.DataLoader(digits, 16, seed=1)
  ft.fit(split_model, split_optimizer, loader, epochs=1, loss_scale=scale(),
         checkpoint_dir=tmp_path / 'split', **common)
  split_model, split_optimizer = make_pair(seed=3)
  resumed = ft.fit(split_model, split_optimizer, loader, epochs=2, loss_scale=scale(),
                   checkpoint_dir=tmp_path / 'split', **common)
  assert_trees_equal(as_numpy(split_model), as_numpy(model))
  np.testing.assert_array_equal(resumed.steps()['loss_scale'], steps['loss_scale'])


def test_a_non_finite_loss_under_loss_scaling_still_raises(digits):
  model, optimizer = make_pair()
  nan_loss = lambda m, b: (ft.classification_loss(m, b)[0] * jnp.nan, {})
  with pytest.raises(FloatingPointError, match='at step 0'):
    ft.fit(model, optimizer, ft.DataLoader(digits, 16), epochs=1, loss_fn=nan_loss, progress=False,
           best_metric=None, loss_scale=ft.dynamic_loss_scale())


def test_the_step_appends_metrics_to_the_buffer_in_order_for_single_and_stacked_steps():
  """fit's metrics stay on the device in one buffer: rows in step order, whatever the dispatch sizes."""
  from flaxtrain.steps import MetricsBuffer, compiled_step, metric_names
  model, optimizer = make_pair()
  step = ft.make_train_step()
  loader = ft.DataLoader(ft.load_digits(seed=0).train, 16, seed=1)
  batches = [b for _, b in zip(range(7), loader.epoch(0))]
  reference = nnx.clone((model, optimizer))
  singles = [float(step(*reference, batch)['loss']) for batch in batches]
  state = step.split(model, optimizer)
  names = metric_names(state, batches[0], None)
  buffer = MetricsBuffer(np.zeros((8, len(names)), np.float32), np.int32(0))
  arrays = [jnp.copy(x) for x in state.read()]
  for steps, batch in [(1, batches[0]), (3, ft.stack_batches(batches[1:4])), (1, batches[4]),
                       (2, ft.stack_batches(batches[5:7]))]:
    arrays, buffer, _, _ = compiled_step(True)(arrays, batch, None, buffer, spec=state.spec,
                                               steps=None if steps == 1 else steps)
  assert int(buffer.count) == 7
  losses = np.asarray(buffer.values)[:7, names.index('loss')]
  np.testing.assert_allclose(losses, singles, rtol=1e-6)
  assert len(set(losses.tolist())) == 7
