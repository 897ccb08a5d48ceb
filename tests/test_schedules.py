"""flaxtrain.schedules against closed-form formulas, and plot_schedule."""

import math

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest
from flax import nnx

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402

import flaxtrain as ft  # noqa: E402


def _on_steps(schedule, steps):
  """The schedule under jax.jit, on int32 steps as optax passes them."""
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, dtype=jnp.int32)), dtype=np.float64)


def _warmup_cosine_reference(t, *, init, peak, warmup, total, alpha):
  t = np.asarray(t, dtype=np.float64)
  ramp = init + (peak - init) * t / max(warmup, 1)
  span = total - warmup
  if span == 0:
    decay = np.full_like(t, alpha * peak)
  else:
    frac = np.clip(t - warmup, 0, span) / span
    decay = peak * (alpha + (1 - alpha) * 0.5 * (1 + np.cos(np.pi * frac)))
  return np.where(t < warmup, ramp, decay)


def _boundary_steps(warmup, total):
  """Step 0, around the warmup boundary, the middle, the last step and past the end."""
  candidates = [0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 1, total, total + 1, 3 * total]
  return sorted({t for t in candidates if t >= 0})


WARMUP_COSINE_CASES = [
    pytest.param(dict(init=0.0, peak=1e-3, warmup=10, total=100, alpha=0.0), id='warmup_from_zero'),
    pytest.param(dict(init=0.0, peak=0.5, warmup=0, total=50, alpha=0.0), id='no_warmup'),
    pytest.param(dict(init=1e-4, peak=3e-3, warmup=25, total=40, alpha=0.1), id='nonzero_init_and_alpha'),
    pytest.param(dict(init=0.0, peak=2.0, warmup=7, total=7, alpha=0.25), id='warmup_equals_total'),
    pytest.param(dict(init=0.0, peak=1.0, warmup=0, total=1, alpha=1.0), id='one_step_alpha_one'),
    pytest.param(dict(init=0.0, peak=1e-2, warmup=1, total=1000, alpha=0.01), id='long_decay'),
]


@pytest.mark.parametrize('case', WARMUP_COSINE_CASES)
def test_warmup_cosine_matches_closed_form_under_jit(case):
  schedule = ft.warmup_cosine(
      case['peak'], case['total'], case['warmup'], init_value=case['init'], alpha=case['alpha']
  )
  steps = _boundary_steps(case['warmup'], case['total'])
  np.testing.assert_allclose(
      _on_steps(schedule, steps), _warmup_cosine_reference(steps, **case),
      rtol=2e-6, atol=1e-6 * case['peak'],  # float32 cancellation in 1 + cos near the end
  )


def test_warmup_cosine_boundaries_are_exact():
  schedule = ft.warmup_cosine(1e-3, total_steps=100, warmup_steps=10, alpha=0.05)
  values = _on_steps(schedule, [0, 10, 100, 150])
  np.testing.assert_allclose(values, [0.0, 1e-3, 0.05 * 1e-3, 0.05 * 1e-3], rtol=1e-6)


def test_alpha_is_a_multiplier_of_the_peak_not_a_final_rate():
  peak, alpha = 1e-3, 0.01
  final = float(ft.warmup_cosine(peak, total_steps=200, warmup_steps=20, alpha=alpha)(200))
  assert math.isclose(final, alpha * peak, rel_tol=1e-6)
  assert not math.isclose(final, alpha, rel_tol=0.5)


@pytest.mark.parametrize('warmup, total, alpha', [(10, 100, 0.0), (1, 30, 0.2), (50, 51, 0.5)])
def test_warmup_cosine_agrees_with_optax_warmup_cosine_decay_schedule(warmup, total, alpha):
  peak = 3e-3
  ours = ft.warmup_cosine(peak, total, warmup, init_value=1e-5, alpha=alpha)
  theirs = optax.warmup_cosine_decay_schedule(1e-5, peak, warmup, decay_steps=total, end_value=alpha * peak)
  steps = np.arange(total + 10)
  np.testing.assert_allclose(_on_steps(ours, steps), _on_steps(theirs, steps), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('staircase', [False, True], ids=['continuous', 'staircase'])
@pytest.mark.parametrize('begin, end_value', [(0, None), (5, None), (0, 0.3)], ids=['plain', 'begin', 'floor'])
def test_exponential_decay_matches_closed_form_under_jit(staircase, begin, end_value):
  init, every, rate = 2.0, 10, 0.5
  schedule = ft.exponential_decay(
      init, every, rate, staircase=staircase, transition_begin=begin, end_value=end_value
  )
  steps = np.array([0, 1, 4, 5, 9, 10, 11, 15, 19, 20, 25, 37, 100])
  exponent = np.maximum(steps - begin, 0) / every
  if staircase:
    exponent = np.floor(exponent)
  expected = init * rate**exponent
  if end_value is not None:
    expected = np.maximum(expected, end_value)
  np.testing.assert_allclose(_on_steps(schedule, steps), expected, rtol=2e-6)


def test_exponential_decay_staircase_differs_from_continuous_between_drops():
  smooth = ft.exponential_decay(1.0, 100, 0.5, staircase=False)
  stairs = ft.exponential_decay(1.0, 100, 0.5, staircase=True)
  np.testing.assert_allclose(_on_steps(smooth, [50, 100]), [0.5**0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(_on_steps(stairs, [50, 99, 100]), [1.0, 1.0, 0.5], rtol=1e-6)


def test_exponential_decay_requires_an_explicit_staircase():
  with pytest.raises(TypeError, match='staircase'):
    ft.exponential_decay(1.0, 10, 0.5)  # pylint: disable=missing-kwoa


@pytest.mark.parametrize('value', [0.0, 1e-3, np.float32(0.1), jnp.float32(2.5)])
def test_constant_schedule(value):
  np.testing.assert_allclose(_on_steps(ft.constant_schedule(value), [0, 7, 10**6]), [float(value)] * 3, rtol=1e-7)


@pytest.mark.parametrize(
    'build, argument, given',
    [
        pytest.param(lambda: ft.warmup_cosine(1e-3, 100, 101), 'warmup_steps', '101', id='warmup_longer_than_total'),
        pytest.param(lambda: ft.warmup_cosine(1e-3, 100, -1), 'warmup_steps', '-1', id='negative_warmup'),
        pytest.param(lambda: ft.warmup_cosine(-1e-3, 100), 'peak_value', '-0.001', id='negative_peak'),
        pytest.param(lambda: ft.warmup_cosine(float('inf'), 100), 'peak_value', 'inf', id='infinite_peak'),
        pytest.param(lambda: ft.warmup_cosine(float('nan'), 100), 'peak_value', 'nan', id='nan_peak'),
        pytest.param(lambda: ft.warmup_cosine('1e-3', 100), 'peak_value', "'1e-3'", id='string_peak'),
        pytest.param(lambda: ft.warmup_cosine(1e-3, 100, init_value=-0.1), 'init_value', '-0.1', id='negative_init'),
        pytest.param(lambda: ft.warmup_cosine(1e-3, 0), 'total_steps', '0', id='zero_total'),
        pytest.param(lambda: ft.warmup_cosine(1e-3, 100.0), 'total_steps', '100.0', id='float_total'),
        pytest.param(lambda: ft.warmup_cosine(1e-3, True), 'total_steps', 'True', id='bool_total'),
        pytest.param(lambda: ft.warmup_cosine(1e-3, 100, alpha=1.5), 'alpha', '1.5', id='alpha_above_one'),
        pytest.param(lambda: ft.warmup_cosine(1e-3, 100, alpha=-0.01), 'alpha', '-0.01', id='negative_alpha'),
        pytest.param(lambda: ft.exponential_decay(-1.0, 10, 0.5, staircase=True), 'init_value', '-1.0', id='exp_negative_init'),
        pytest.param(lambda: ft.exponential_decay(1.0, 0, 0.5, staircase=True), 'transition_steps', '0', id='exp_zero_steps'),
        pytest.param(lambda: ft.exponential_decay(1.0, 10, 0.0, staircase=True), 'decay_rate', '0.0', id='exp_zero_rate'),
        pytest.param(lambda: ft.exponential_decay(1.0, 10, 1.5, staircase=True), 'decay_rate', '1.5', id='exp_growth_rate'),
        pytest.param(lambda: ft.exponential_decay(1.0, 10, 0.5, staircase='yes'), 'staircase', "'yes'", id='exp_staircase_str'),
        pytest.param(lambda: ft.exponential_decay(1.0, 10, 0.5, staircase=True, transition_begin=-2), 'transition_begin', '-2', id='exp_negative_begin'),
        pytest.param(lambda: ft.exponential_decay(1.0, 10, 0.5, staircase=True, end_value=2.0), 'end_value', '2.0', id='exp_floor_above_init'),
        pytest.param(lambda: ft.constant_schedule(-0.5), 'value', '-0.5', id='constant_negative'),
        pytest.param(lambda: ft.constant_schedule(None), 'value', 'None', id='constant_none'),
    ],
)
def test_invalid_inputs_name_the_argument_and_the_value(build, argument, given):
  with pytest.raises(ValueError) as info:
    build()
  message = str(info.value)
  assert message.startswith(f'{argument}: expected'), message
  assert message.endswith(f'got {given}'), message


def test_update_t_uses_schedule_of_t_through_the_train_step():
  """The rate the train step reports is the rate it applied, at the right step."""

  class Weight(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros(()))

  def loss_fn(model, batch):
    return model.w[...] * batch['slope'], {}  # gradient = slope = 1

  schedule = ft.warmup_cosine(0.1, total_steps=8, warmup_steps=3, alpha=0.2)
  model = Weight()
  optimizer = nnx.Optimizer(model, optax.inject_hyperparams(optax.sgd)(learning_rate=schedule), wrt=nnx.Param)
  train_step = ft.make_train_step(loss_fn)
  moved, reported = [], []
  for _ in range(10):
    before = float(model.w[...])
    metrics = train_step(model, optimizer, {'slope': jnp.float32(1.0)})
    moved.append(before - float(model.w[...]))
    reported.append(float(metrics['learning_rate']))
  expected = _on_steps(schedule, np.arange(10))
  np.testing.assert_allclose(reported, expected, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(moved, expected, rtol=1e-5, atol=1e-8)


# plot_schedule ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _close_figures():
  yield
  plt.close('all')


@pytest.mark.parametrize(
    'schedule',
    [
        pytest.param(ft.warmup_cosine(1e-3, 50, 5, alpha=0.1), id='warmup_cosine'),
        pytest.param(ft.exponential_decay(1.0, 7, 0.5, staircase=True), id='staircase'),
        pytest.param(optax.constant_schedule(0.3), id='optax_constant'),
        pytest.param(lambda step: 0.1 / jnp.sqrt(step + 1.0), id='custom_callable'),
    ],
)
def test_plot_schedule_draws_the_schedule_values(schedule):
  ax = ft.plot_schedule(schedule, 60, label='lr')
  (line,) = ax.get_lines()
  x, y = line.get_data()
  np.testing.assert_array_equal(x, np.arange(60))
  np.testing.assert_allclose(y, [float(schedule(jnp.int32(t))) for t in range(60)], rtol=1e-6)
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ['lr']
  assert ax.get_xlabel() == 'step' and ax.get_ylabel() == 'learning rate'


def test_plot_schedule_draws_on_the_given_axes_and_passes_style():
  _, ax = plt.subplots()
  figures_before = plt.get_fignums()
  returned = ft.plot_schedule(ft.constant_schedule(0.1), 5, ax=ax, color='red', ls='--')
  returned = ft.plot_schedule(ft.constant_schedule(0.2), 5, ax=ax)
  assert returned is ax
  assert plt.get_fignums() == figures_before
  assert len(ax.get_lines()) == 2
  assert ax.get_lines()[0].get_linestyle() == '--'
  assert ax.get_legend() is None


def test_plot_schedule_leaves_global_matplotlib_state_alone():
  before = dict(matplotlib.rcParams)
  ft.plot_schedule(ft.constant_schedule(0.1), 5, label='x')
  assert dict(matplotlib.rcParams) == before


@pytest.mark.parametrize(
    'schedule, num_steps, error, match',
    [
        pytest.param(0.1, 10, TypeError, 'schedule: expected a callable', id='not_callable'),
        pytest.param(optax.constant_schedule(0.1), 0, ValueError, 'num_steps: expected a positive int, got 0', id='zero_steps'),
        pytest.param(optax.constant_schedule(0.1), 10.0, ValueError, 'num_steps: expected a positive int, got 10.0', id='float_steps'),
        pytest.param(lambda step: jnp.ones(2) * step, 10, ValueError, r'schedule: expected a scalar .* got shape \(2,\)', id='vector_output'),
    ],
)
def test_plot_schedule_rejects_bad_input(schedule, num_steps, error, match):
  with pytest.raises(error, match=match):
    ft.plot_schedule(schedule, num_steps)
