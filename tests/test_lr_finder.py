"""find_learning_rate: the rates it tries, the copy it trains, its stop rule and suggestion."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from matplotlib.figure import Figure

import flaxtrain as ft


@pytest.fixture(scope='module')
def splits():
  return ft.load_digits(seed=0)


def _model(seed=0):
  return ft.MLP(64, [32], 10, rngs=nnx.Rngs(seed))


def test_model_and_optimizer_are_unchanged(splits):
  model = _model()
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  before = jax.tree.map(np.array, (nnx.state(model), nnx.state(optimizer)))
  result = ft.find_learning_rate(model, optax.adam, ft.DataLoader(splits.train, 64, seed=0), num_steps=30)
  after = jax.tree.map(np.array, (nnx.state(model), nnx.state(optimizer)))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert len(result.losses) == 30


def test_rates_grow_exponentially_from_min_to_max(splits):
  result = ft.find_learning_rate(_model(), optax.sgd, [splits.train], min_lr=1e-4, max_lr=1e-2,
                                 num_steps=21, diverge_factor=1e9)
  np.testing.assert_allclose(result.learning_rates, 1e-4 * 100 ** (np.arange(21) / 20), rtol=1e-12)
  assert not result.diverged


def test_losses_are_the_training_losses_at_those_rates(splits):
  """Replaying the same steps by hand with the recorded rates gives the recorded losses."""
  batch = {k: v[:128] for k, v in splits.train.items()}
  result = ft.find_learning_rate(_model(), optax.sgd, [batch], min_lr=1e-3, max_lr=1.0, num_steps=12,
                                 diverge_factor=1e9)
  model = _model()
  step = ft.make_train_step()
  for rate, recorded in zip(result.learning_rates, result.losses):
    optimizer = nnx.Optimizer(model, optax.sgd(rate), wrt=nnx.Param)  # plain SGD has no state to carry
    np.testing.assert_allclose(float(step(model, optimizer, batch)['loss']), recorded, rtol=1e-5)


def test_stops_early_when_the_loss_diverges_and_suggests_below_the_minimum(splits):
  result = ft.find_learning_rate(_model(), optax.sgd, ft.DataLoader(splits.train, 64, seed=0),
                                 min_lr=1e-3, max_lr=1e4, num_steps=300)
  assert result.diverged and len(result.losses) < 300
  last = result.smoothed[-1]
  assert not np.isfinite(last) or last > 4.0 * np.min(result.smoothed)
  lowest = result.learning_rates[np.argmin(result.smoothed)]
  assert result.suggestion == pytest.approx(lowest / 10) and result.best_learning_rate == lowest


def test_smoothed_is_the_bias_corrected_moving_average(splits):
  result = ft.find_learning_rate(_model(), optax.adam, [splits.train], num_steps=15, smoothing=0.5,
                                 diverge_factor=1e9)
  expected, average = [], 0.0
  for i, loss in enumerate(result.losses):
    average = 0.5 * average + 0.5 * loss
    expected.append(average / (1 - 0.5 ** (i + 1)))
  np.testing.assert_allclose(result.smoothed, expected, rtol=1e-12)


def test_plot_draws_the_curve_and_the_suggestion(splits):
  result = ft.find_learning_rate(_model(), optax.adam, [splits.train], num_steps=12)
  ax = ft.plot_lr_finder(result, ax=Figure().subplots())
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), result.losses)
  assert ax.get_xscale() == 'log'
  assert result.suggestion in [line.get_xdata()[0] for line in ax.get_lines()]


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(model='m'), TypeError, 'model: expected an nnx.Module'),
    (dict(make_tx=0.1), TypeError, 'make_tx: expected a function'),
    (dict(loader=iter([{}])), TypeError, 'loader: expected'),
    (dict(min_lr=0.0), ValueError, 'min_lr: expected a number > 0'),
    (dict(min_lr=1e-2, max_lr=1e-3), ValueError, 'max_lr: expected a number > min_lr'),
    (dict(num_steps=5), ValueError, 'num_steps: expected an int >= 10'),
    (dict(smoothing=1.0), ValueError, r'smoothing: expected a number in \[0, 1\)'),
    (dict(diverge_factor=1.0), ValueError, 'diverge_factor: expected a number > 1'),
    (dict(loader=[]), ValueError, 'loader: expected at least one batch'),
])
def test_validates_arguments(splits, kwargs, error, match):
  arguments = dict(model=_model(), make_tx=optax.adam, loader=[splits.train], num_steps=10)
  arguments.update(kwargs)
  with pytest.raises(error, match=match):
    ft.find_learning_rate(arguments.pop('model'), arguments.pop('make_tx'), arguments.pop('loader'),
                          **arguments)


def test_a_factory_that_returns_no_transformation_is_named():
  model = ft.MLP(64, (8,), 10, rngs=nnx.Rngs(0))
  batches = [{'image': np.zeros((8, 64), np.float32), 'label': np.zeros(8, np.int32)}]
  with pytest.raises(TypeError, match=r'make_tx: expected a function that returns an optax.GradientTransformation.*'
                                      r'returned float'):
    ft.find_learning_rate(model, lambda lr: 0.1, batches, num_steps=10)


def test_a_sweep_whose_loss_never_fell_warns_that_its_suggestion_means_nothing():
  model = ft.MLP(64, (8,), 10, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(16, 64)).astype(np.float32), 'label': rng.integers(0, 10, 16).astype(np.int32)}]
  # Gradient ascent: every step makes the loss worse, so the lowest smoothed loss is the first.
  with pytest.warns(RuntimeWarning, match='the smoothed loss never fell below its first value'):
    ft.find_learning_rate(model, lambda lr: optax.sgd(lambda step: -lr(step)), batches, min_lr=1e-2, max_lr=1.0,
                          num_steps=20)
