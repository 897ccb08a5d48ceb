"""The compiled train step: same updates as nnx.jit, fallbacks, donation, many steps, loss scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft
from flaxtrain import steps as steps_module


def make_batch(seed, n=16):
  rng = np.random.default_rng(seed)
  return {
      'image': rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
      'label': rng.integers(0, 10, size=n).astype(np.int32),
  }


class Tied(nnx.Module):
  """Two layers that share one kernel Variable, and a submodule reachable twice."""

  def __init__(self, rngs):
    self.a = nnx.Linear(64, 64, rngs=rngs)
    self.b = nnx.Linear(64, 64, rngs=rngs)
    self.b.kernel = self.a.kernel
    self.head = nnx.Linear(64, 10, rngs=rngs)
    self.same_head = self.head

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return self.same_head(nnx.relu(self.b(nnx.relu(self.a(x)))))


def make_model(kind, seed=0):
  rngs = nnx.Rngs(seed)
  if kind == 'mlp':
    return ft.MLP(64, (16,), 10, rngs=rngs)
  if kind == 'dropout':
    return ft.MLP(64, (16, 16), 10, dropout_rate=0.3, rngs=rngs)
  if kind == 'batchnorm':
    return ft.CNN(rngs=rngs, features=(4, 8), hidden=16, batch_norm=True, dropout_rate=0.2)
  if kind == 'tied':
    return Tied(rngs)
  raise ValueError(kind)


def make_pair(kind, seed=0, tx=None):
  model = make_model(kind, seed)
  return model, nnx.Optimizer(model, tx or optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def reference_step(model, optimizer, batch):
  (loss, _), grads = nnx.value_and_grad(ft.classification_loss, has_aux=True)(model, batch)
  optimizer.update(model, grads)
  return loss


def assert_same_state(a, b, atol=0.0):
  got = jax.tree.leaves(nnx.state(a, nnx.Not(nnx.RngKey)))
  want = jax.tree.leaves(nnx.state(b, nnx.Not(nnx.RngKey)))
  assert len(got) == len(want)
  for x, y in zip(got, want):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)
  keys_a = [jax.random.key_data(k) for k in jax.tree.leaves(nnx.state(a, nnx.RngKey))]
  keys_b = [jax.random.key_data(k) for k in jax.tree.leaves(nnx.state(b, nnx.RngKey))]
  jax.tree.map(np.testing.assert_array_equal, keys_a, keys_b)


@pytest.mark.parametrize('kind', ['mlp', 'dropout', 'batchnorm', 'tied'])
def test_step_matches_the_nnx_jit_step_bit_for_bit(kind):
  model, optimizer = make_pair(kind)
  ref_model, ref_optimizer = make_pair(kind)
  step = ft.make_train_step()
  for seed in range(3):
    metrics = step(model, optimizer, make_batch(seed))
    loss = reference_step(ref_model, ref_optimizer, make_batch(seed))
    assert float(metrics['loss']) == float(loss)
  assert step.uses_fast_path(model, optimizer), 'this model should take the fast path'
  assert_same_state((model, optimizer), (ref_model, ref_optimizer))
  if kind == 'tied':
    assert model.b.kernel is model.a.kernel and model.same_head is model.head


def test_model_and_optimizer_are_current_after_every_call():
  model, optimizer = make_pair('mlp')
  step = ft.make_train_step()
  for seed in range(3):
    before = np.asarray(model.out.kernel[...])
    step(model, optimizer, make_batch(seed))
    assert not np.array_equal(model.out.kernel[...], before)
    assert int(optimizer.step[...]) == seed + 1
    # The user's own eager call sees the new parameters.
    np.testing.assert_allclose(model(make_batch(0)['image'])[0], model(make_batch(0)['image'])[0])


def test_replacing_a_submodule_between_calls_trains_the_new_one():
  model, optimizer = make_pair('mlp')
  step = ft.make_train_step()
  step(model, optimizer, make_batch(0))
  new_out = nnx.Linear(16, 10, rngs=nnx.Rngs(5))
  model.out = new_out
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  ref_model = nnx.clone(model)
  ref_optimizer = nnx.Optimizer(ref_model, optax.sgd(0.1), wrt=nnx.Param)
  step(model, optimizer, make_batch(1))
  reference_step(ref_model, ref_optimizer, make_batch(1))
  assert model.out is new_out
  assert_same_state(model, ref_model)


def test_switching_modes_and_nnx_update_between_calls_are_seen():
  model, optimizer = make_pair('dropout')
  step = ft.make_train_step(lambda m, b: (jnp.mean(m(b['image']) ** 2), {}))
  batch = make_batch(0)
  step(model, optimizer, batch)
  model.eval()  # Dropout off: the step must retrace, not reuse the training-mode graph
  ref_model, ref_optimizer = nnx.clone(model), nnx.clone(optimizer)
  first = step(model, optimizer, batch)
  ref = nnx.jit(lambda m, o, b: steps_module.update(step.loss_fn, m, o, b, None)[0])(ref_model, ref_optimizer, batch)
  assert float(first['loss']) == float(ref['loss'])
  # nnx.update puts new arrays into the same Variables: the next step starts from them.
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  nnx.update(model, zeros)
  metrics = step(model, optimizer, batch)
  assert float(metrics['loss']) == 0.0  # an all-zero MLP outputs zeros


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # Module.sow outside nnx.capture
def test_a_step_that_changes_the_graph_falls_back_and_stays_correct():
  def sowing_loss(model, batch):
    model.sow(nnx.Intermediate, 'seen', jnp.float32(1.0))
    return ft.classification_loss(model, batch)

  model, optimizer = make_pair('mlp')
  ref_model, ref_optimizer = make_pair('mlp')
  step = ft.make_train_step(sowing_loss)
  general = nnx.jit(lambda m, o, b: steps_module.update(sowing_loss, m, o, b, None)[0])
  for seed in range(2):
    step(model, optimizer, make_batch(seed))
    general(ref_model, ref_optimizer, make_batch(seed))
  assert not step.uses_fast_path(model, optimizer)
  assert 'seen' in vars(model)
  assert_same_state(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))


def test_a_call_inside_another_transform_uses_the_general_path():
  model, optimizer = make_pair('mlp')
  ref_model, ref_optimizer = make_pair('mlp')
  step = ft.make_train_step()
  outer = nnx.jit(lambda m, o, b: step(m, o, b)['loss'])
  outer(model, optimizer, make_batch(0))
  reference_step(ref_model, ref_optimizer, make_batch(0))
  assert_same_state((model, optimizer), (ref_model, ref_optimizer))
  assert all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
             for x in jax.tree.leaves(nnx.state(model)))


def test_the_default_step_never_deletes_an_array_the_user_holds_or_a_clone_shares():
  traces = []

  def loss_fn(model, batch):
    traces.append(1)
    return ft.classification_loss(model, batch)

  model, optimizer = make_pair('mlp')
  step = ft.make_train_step(loss_fn)
  step(model, optimizer, make_batch(0))
  held = model.out.kernel.get_value()
  held_copy = np.array(held)
  twin = nnx.clone(model)  # shares the arrays, does not copy them
  step(model, optimizer, make_batch(1))
  assert not held.is_deleted()
  np.testing.assert_array_equal(held, held_copy)
  np.testing.assert_array_equal(twin.out.kernel[...], held_copy)
  assert model.out.kernel.get_value().unsafe_buffer_pointer() != held.unsafe_buffer_pointer()
  assert len(traces) == 1, 'holding a reference must not recompile the step'


def test_donation_reuses_buffers_and_deletes_what_shared_them():
  model, optimizer = make_pair('mlp')
  step = ft.make_train_step(donate=True)
  step(model, optimizer, make_batch(0))
  # The new kernel is written into the old buffer.
  pointer = model.out.kernel.get_value().unsafe_buffer_pointer()
  held = model.out.kernel.get_value()
  step(model, optimizer, make_batch(1))
  assert model.out.kernel.get_value().unsafe_buffer_pointer() == pointer
  assert held.is_deleted(), 'a donated array is deleted: that is what the docstring warns about'
  with pytest.raises(TypeError, match='donate: expected True or False'):
    ft.make_train_step(donate='yes')


def test_memory_analysis_shows_the_state_is_aliased_not_copied():
  model, optimizer = make_pair('mlp')
  step = ft.make_train_step(donate=True)
  batch = make_batch(0)
  stats = step.lower(model, optimizer, batch).compile().memory_analysis()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state((model, optimizer))))
  assert stats.alias_size_in_bytes >= state_bytes
  assert stats.output_size_in_bytes - stats.alias_size_in_bytes < state_bytes / 2


# Many steps per dispatch --------------------------------------------------------


@pytest.mark.parametrize('kind, mode', [('dropout', 'scan'), ('dropout', 'unroll'), ('batchnorm', 'loop')])
def test_many_gives_what_single_steps_give(kind, mode):
  batches = [make_batch(seed) for seed in range(3)]
  model, optimizer = make_pair(kind)
  ref_model, ref_optimizer = make_pair(kind)
  step = ft.make_train_step()
  metrics = step.many(model, optimizer, ft.stack_batches(batches), mode=mode)
  singles = [step(ref_model, ref_optimizer, batch) for batch in batches]
  assert set(metrics) == set(singles[0])
  for name in metrics:
    assert metrics[name].shape == (3,)
    np.testing.assert_allclose(metrics[name], [float(m[name]) for m in singles], rtol=1e-6)
  assert_same_state((model, optimizer), (ref_model, ref_optimizer), atol=1e-6)


def test_many_mode_scans_an_mlp_and_loops_a_cnn_on_cpu():
  step = ft.make_train_step()
  stacked = ft.stack_batches([make_batch(0), make_batch(1)])
  expected = {'mlp': 'scan', 'batchnorm': 'loop'} if jax.default_backend() == 'cpu' else {
      'mlp': 'scan', 'batchnorm': 'scan'}
  for kind, mode in expected.items():
    model, optimizer = make_pair(kind)
    assert step.many_mode(model, optimizer, stacked) == mode


def test_many_rejects_batches_that_are_not_stacked():
  model, optimizer = make_pair('mlp')
  step = ft.make_train_step()
  with pytest.raises(ValueError, match=r"batches: expected every array to have the same leading axis"):
    step.many(model, optimizer, {'image': np.zeros((2, 16, 8, 8, 1), np.float32), 'label': np.zeros((3, 16))})
  with pytest.raises(TypeError, match='batches: expected a dict of arrays'):
    step.many(model, optimizer, [make_batch(0)])
  with pytest.raises(ValueError, match="mode: expected one of"):
    step.many(model, optimizer, ft.stack_batches([make_batch(0)]), mode='fast')


def test_stack_batches_stacks_on_a_new_leading_axis():
  batches = [make_batch(seed) for seed in range(3)]
  stacked = ft.stack_batches(batches)
  assert isinstance(stacked['image'], np.ndarray) and stacked['image'].shape == (3, 16, 8, 8, 1)
  np.testing.assert_array_equal(stacked['label'][2], batches[2]['label'])
  on_device = ft.stack_batches([{k: jnp.asarray(v) for k, v in b.items()} for b in batches])
  assert isinstance(on_device['image'], jax.Array)
  np.testing.assert_array_equal(on_device['image'], stacked['image'])


@pytest.mark.parametrize('batches, error, match', [
    ([], TypeError, r'batches: expected a non-empty list of batch dicts, got list of length 0'),
    ({'x': np.zeros(3)}, TypeError, 'batches: expected a non-empty list'),
    ([(1, 2)], TypeError, r'batches\[0\]: expected a dict of arrays, got a tuple of 2'),
    ([{'x': np.zeros(3)}, {'y': np.zeros(3)}], ValueError, r"batches\[1\]: expected a dict with keys \['x'\]"),
    ([{'x': np.zeros(3)}, {'x': np.zeros(2)}], ValueError,
     r"batches\[1\]\['x'\]: expected shape \(3,\) and dtype float64 like batches\[0\], got shape \(2,\)"),
    ([{'x': np.zeros(3)}, {'x': np.zeros(3, np.float32)}], ValueError, r"got shape \(3,\) and dtype float32"),
])
def test_stack_batches_rejects_what_does_not_stack(batches, error, match):
  with pytest.raises(error, match=match):
    ft.stack_batches(batches)


# Loss scaling -------------------------------------------------------------------


def test_loss_scaling_gives_the_same_parameters_when_nothing_overflows():
  model, optimizer = make_pair('dropout')
  ref_model, ref_optimizer = make_pair('dropout')
  scaled = ft.make_train_step(loss_scale=ft.dynamic_loss_scale(2.0**10, growth_interval=2))
  plain = ft.make_train_step()
  for seed in range(3):
    metrics = scaled(model, optimizer, make_batch(seed))
    ref = plain(ref_model, ref_optimizer, make_batch(seed))
    assert float(metrics['loss']) == float(ref['loss'])
    np.testing.assert_allclose(metrics['grad_norm'], ref['grad_norm'], rtol=1e-6)
    assert float(metrics['grads_finite']) == 1.0
  assert [float(scaled.loss_scale.scale), int(scaled.loss_scale.good_steps)] == [2048.0, 1]
  assert_same_state((model, optimizer), (ref_model, ref_optimizer))


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off():
  model, optimizer = make_pair('dropout')
  step = ft.make_train_step(loss_scale=ft.dynamic_loss_scale(2.0**15))
  huge = lambda m, b: (jnp.sum(m(b['image'] * 1e30)) * 1e30, {})  # gradients overflow float32
  step_huge = ft.make_train_step(huge, loss_scale=ft.dynamic_loss_scale(2.0**15))
  params = jax.tree.map(np.array, nnx.state((model, optimizer), nnx.Not(nnx.RngState)))
  count = int(model.dropout.rngs.count[...])
  metrics = step_huge(model, optimizer, make_batch(0))
  assert float(metrics['grads_finite']) == 0.0 and float(metrics['loss_scale']) == 2.0**15
  assert float(step_huge.loss_scale.scale) == 2.0**14
  after = nnx.state((model, optimizer), nnx.Not(nnx.RngState))
  jax.tree.map(np.testing.assert_array_equal, after, params)  # nothing applied
  # Dropout's stream still advanced, so the retried step draws a new mask.
  assert int(model.dropout.rngs.count[...]) > count
  assert int(optimizer.step[...]) == 0
  good = step(model, optimizer, make_batch(0))
  assert float(good['grads_finite']) == 1.0 and int(optimizer.step[...]) == 1


@pytest.mark.parametrize('mode', ['scan', 'loop'])
def test_loss_scaling_works_with_many_steps(mode):
  batches = [make_batch(seed) for seed in range(3)]
  model, optimizer = make_pair('mlp')
  ref_model, ref_optimizer = make_pair('mlp')
  many = ft.make_train_step(loss_scale=ft.dynamic_loss_scale(4.0, growth_interval=2))
  single = ft.make_train_step(loss_scale=ft.dynamic_loss_scale(4.0, growth_interval=2))
  metrics = many.many(model, optimizer, ft.stack_batches(batches), mode=mode)
  for batch in batches:
    single(ref_model, ref_optimizer, batch)
  np.testing.assert_array_equal(metrics['loss_scale'], [4.0, 4.0, 8.0])
  assert float(many.loss_scale.scale) == float(single.loss_scale.scale) == 8.0
  assert_same_state((model, optimizer), (ref_model, ref_optimizer), atol=1e-6)


def test_loss_scale_must_be_a_dynamic_loss_scale():
  with pytest.raises(TypeError, match='loss_scale: expected a DynamicLossScale'):
    ft.make_train_step(loss_scale=1024.0)
  step = ft.make_train_step()
  with pytest.raises(ValueError, match='loss_scale: a step made without loss scaling'):
    step.loss_scale = ft.dynamic_loss_scale()


def test_many_in_loop_mode_splits_device_stacks_like_host_stacks():
  batches = [make_batch(seed) for seed in range(3)]
  on_host = ft.stack_batches(batches)
  on_device = {key: jnp.asarray(value) for key, value in on_host.items()}
  step = ft.make_train_step()
  results = []
  for stacked in (on_host, on_device):
    model, optimizer = make_pair('mlp')
    metrics = step.many(model, optimizer, stacked, mode='loop')
    results.append((np.asarray(metrics['loss']), np.asarray(model.out.kernel[...])))
  np.testing.assert_array_equal(results[0][0], results[1][0])
  np.testing.assert_array_equal(results[0][1], results[1][1])
  assert len(set(results[0][0].tolist())) == 3  # three different batches


def test_many_in_loop_mode_keeps_a_held_array_and_writes_every_step_back():
  """Loop mode carries the arrays from step to step and writes them back once: same as single steps."""
  batches = [make_batch(seed) for seed in range(1, 4)]
  model, optimizer = make_pair('mlp')
  ref_model, ref_optimizer = make_pair('mlp')
  step = ft.make_train_step()
  step(model, optimizer, make_batch(0))
  step(ref_model, ref_optimizer, make_batch(0))
  held = model.out.kernel.get_value()
  held_copy = np.array(held)
  metrics = step.many(model, optimizer, ft.stack_batches(batches), mode='loop')
  singles = [float(step(ref_model, ref_optimizer, batch)['loss']) for batch in batches]
  assert not held.is_deleted()
  np.testing.assert_array_equal(held, held_copy)
  np.testing.assert_array_equal(metrics['loss'], singles)
  assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state((model, optimizer))))
  assert_same_state((model, optimizer), (ref_model, ref_optimizer))


def test_an_nnx_jit_eval_step_between_calls_keeps_the_split():
  """nnx.jit renews Flax's bookkeeping in each object; that is not a change of structure."""
  model, optimizer = make_pair('mlp')
  ref_model, ref_optimizer = make_pair('mlp')
  step = ft.make_train_step()
  general_eval = nnx.jit(lambda m, b: ft.classification_loss(m, b)[0])
  step(model, optimizer, make_batch(0))
  split = step.state(model, optimizer, make_batch(1))
  general_eval(model, make_batch(1))
  step(model, optimizer, make_batch(2))
  assert step.state(model, optimizer, make_batch(1)) is split
  assert step.uses_fast_path(model, optimizer)
  for seed in (0, 2):
    reference_step(ref_model, ref_optimizer, make_batch(seed))
  assert_same_state((model, optimizer), (ref_model, ref_optimizer))
