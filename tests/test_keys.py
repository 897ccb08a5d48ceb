"""The key a compiled step is cached under: equal only for optimizers that compute the same update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft
from flaxtrain.keys import function_key
from flaxtrain.keys import optimizer_key


def make_model(seed=0):
  return ft.MLP(64, (16,), 10, rngs=nnx.Rngs(seed))


def key_of(tx):
  model = make_model()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params, state = ft.steps.check_model_and_optimizer(model, optimizer)
  return optimizer_key(optimizer, params, state)


def batch(seed):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32), 'label': rng.integers(0, 10, 8)}


BUILT_TWICE_ALIKE = [
    ('adam', lambda: optax.adam(1e-3)),
    ('sgd with momentum', lambda: optax.sgd(0.1, momentum=0.9)),
    ('clipped adamw on a schedule', lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)))),
    ('injected hyperparameters', lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)),
    ('apply_if_finite', lambda: optax.apply_if_finite(optax.adam(1e-3), 3)),
    ('make_optimizer', lambda: ft.make_optimizer('adamw', learning_rate=1e-3)),
]


@pytest.mark.parametrize('name, make', BUILT_TWICE_ALIKE, ids=[name for name, _ in BUILT_TWICE_ALIKE])
def test_an_optimizer_built_twice_alike_has_one_key_read_from_its_functions(name, make):
  first, second = key_of(make()), key_of(make())
  assert first == second and hash(first) == hash(second)
  assert first[2] == 'functions'  # the quick description, not the jaxpr


DIFFERENT = [
    ('learning rate', lambda: optax.adam(1e-3), lambda: optax.adam(2e-3)),
    ('b1', lambda: optax.adam(1e-3), lambda: optax.adam(1e-3, b1=0.8)),
    ('schedule peak', lambda: optax.adam(optax.linear_schedule(0.0, 1e-3, 10)),
     lambda: optax.adam(optax.linear_schedule(0.0, 2e-3, 10))),
    ('clipping threshold', lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
     lambda: optax.chain(optax.clip_by_global_norm(2.0), optax.sgd(0.1))),
    ('weight decay mask', lambda: optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
     lambda: optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 0, p))),
    ('an int against a float', lambda: optax.sgd(1), lambda: optax.sgd(1.0)),
]


@pytest.mark.parametrize('name, make, other', DIFFERENT, ids=[name for name, _, _ in DIFFERENT])
def test_optimizers_that_differ_in_one_setting_have_different_keys(name, make, other):
  assert key_of(make()) != key_of(other())


def test_a_module_level_helper_redefined_between_two_builds_changes_the_key():
  """What a notebook does when a cell defining a helper is edited and run again."""
  namespace = {'jax': jax}
  source = '''
def direction(g):
  return {scale} * g

def make():
  def update(grads, state, params=None):
    return jax.tree.map(direction, grads), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
'''
  namespace['optax'] = optax
  exec(source.format(scale=-0.1), namespace)
  first = namespace['make']()
  before = function_key(first.update)
  exec(source.replace('def make', 'def _unused').format(scale=-0.5), namespace)  # only the helper changes
  second = namespace['make']()
  assert first.update.__code__ is second.update.__code__  # the same code object: only the global differs
  # Both now read the new helper when traced, so both have the new key, which is not the old one: a step
  # compiled with the old helper is not reused.
  assert function_key(first.update) == function_key(second.update) != before


def test_a_mutable_captured_list_is_read_at_each_call():
  scales = [0.1]
  tx = optax.GradientTransformation(lambda params: optax.EmptyState(),
                                    lambda g, s, p=None: (jax.tree.map(lambda x: -scales[0] * x, g), s))
  before = function_key(tx.update)
  scales[0] = 0.2
  assert function_key(tx.update) != before


class Scaler:  # a user's object: its attributes could change between calls, so it is not read as data
  def __init__(self, scale):
    self.scale = scale

  def __call__(self, grads):
    return jax.tree.map(lambda g: -self.scale * g, grads)


def scaled_by(scaler):
  return optax.GradientTransformation(lambda params: optax.EmptyState(), lambda g, s, p=None: (scaler(g), s))


def test_an_object_that_cannot_be_read_as_data_falls_back_to_the_jaxpr():
  assert function_key(scaled_by(Scaler(0.1)).update) is None
  first, same, other = key_of(scaled_by(Scaler(0.1))), key_of(scaled_by(Scaler(0.1))), key_of(scaled_by(Scaler(0.3)))
  assert first[2] == 'jaxpr'
  assert first == same and first != other


def test_a_step_compiled_for_one_rate_is_not_reused_for_another():
  """The end-to-end consequence: the second optimizer trains with its own rate, as nnx.jit would."""
  step = ft.make_train_step()

  @nnx.jit
  def reference_step(model, optimizer, batch):
    grads = nnx.grad(lambda m: ft.classification_loss(m, batch)[0])(model)
    optimizer.update(model, grads)

  for rate in (1e-3, 5e-2):  # the first compiles the step; the second must not reuse the first's rate
    model, twin = make_model(), make_model()
    optimizer = nnx.Optimizer(model, optax.adam(rate), wrt=nnx.Param)
    twin_optimizer = nnx.Optimizer(twin, optax.adam(rate), wrt=nnx.Param)
    for seed in range(3):
      step(model, optimizer, batch(seed))
      reference_step(twin, twin_optimizer, batch(seed))
    for ours, theirs in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(twin))):
      np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_large_array_the_update_reads_is_not_hashed_on_every_call_the_jaxpr_describes_it():
  big = np.ones(1 << 17, np.float32)  # e.g. a notebook's data set that a custom update happens to read
  tx = optax.GradientTransformation(lambda params: optax.EmptyState(),
                                    lambda g, s, p=None: (jax.tree.map(lambda x: -0.1 * x * big[0], g), s))
  assert function_key(tx.update) is None
  assert key_of(tx)[2] == 'jaxpr'


def test_a_jitted_helper_redefined_in_a_notebook_changes_the_key():
  """A notebook's names live in __main__: a jitted helper defined again is read through its __wrapped__."""
  namespace = {'__name__': '__main__', 'jax': jax, 'optax': optax}
  source = '''
helper = jax.jit(lambda g: {scale} * g)

def make():
  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      lambda grads, state, params=None: (jax.tree.map(helper, grads), state))
'''
  exec(source.format(scale=-0.1), namespace)
  tx = namespace['make']()
  before = function_key(tx.update)
  assert before is not None
  exec(source.format(scale=-0.1), namespace)  # the cell run again, unchanged
  assert function_key(namespace['make']().update) == before
  exec(source.format(scale=-0.5), namespace)  # the cell edited and run again
  assert function_key(tx.update) != before
