import matplotlib

matplotlib.use('Agg')

import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

import flaxtrain as ft  # noqa: E402


@pytest.fixture
def history():
  history = ft.History()
  for step in range(1, 21):
    history.record_step(step, {'loss': 2.0 / step})
  history.record_epoch(0, {'train_loss': 0.5, 'val_loss': 0.6}, step=10)
  history.record_epoch(1, {'train_loss': 0.2, 'val_loss': 0.3}, step=20)
  return history


def test_plot_history_draws_train_and_validation_on_the_given_axes(history):
  fig, ax = plt.subplots()
  returned = ft.plot_history(history, 'loss', ax=ax)
  assert returned is ax
  labels = [line.get_label() for line in ax.get_lines()]
  assert labels == ['train loss (step)', 'train loss (epoch)', 'val loss (epoch)']
  np.testing.assert_array_equal(ax.get_lines()[2].get_xdata(), [10, 20])
  np.testing.assert_array_equal(ax.get_lines()[2].get_ydata(), [0.6, 0.3])
  plt.close(fig)


def test_plot_history_unknown_metric_lists_the_recorded_ones(history):
  with pytest.raises(ValueError, match=r"metric: expected one of the recorded metrics \['loss', 'train_loss', 'val_loss'\], got 'accuracy'"):
    ft.plot_history(history, 'accuracy')


def test_plot_history_leaves_global_state_alone(history):
  before = dict(matplotlib.rcParams)
  ax = ft.plot_history(history, 'loss', log_scale=True)
  assert ax.get_yscale() == 'log'
  assert dict(matplotlib.rcParams) == before
  plt.close(ax.figure)


def test_plot_schedule_draws_the_schedule_values():
  schedule = optax.linear_schedule(0.0, 1.0, 10)
  ax = ft.plot_schedule(schedule, 12, label='warmup')
  line = ax.get_lines()[0]
  np.testing.assert_allclose(line.get_ydata(), [min(s / 10, 1.0) for s in range(12)], rtol=1e-6)
  assert line.get_label() == 'warmup'
  plt.close(ax.figure)


def test_plot_history_given_a_dict_says_what_to_pass(history):
  with pytest.raises(TypeError, match=r'history: expected a flaxtrain.History, got dict .*pass the History itself'):
    ft.plot_history(history.steps(), 'loss')


def test_plot_schedule_names_the_first_step_with_a_non_finite_rate():
  schedule = lambda step: 1e-3 / (10 - step)  # noqa: E731  # division by zero at step 10
  with pytest.raises(ValueError, match=r'schedule: expected a finite learning rate at every step, got inf at step 10'):
    ft.plot_schedule(schedule, 20)
