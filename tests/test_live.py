"""LivePlot and the notebook progress bar: what they draw and store, headless."""

import warnings

import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft
from flaxtrain import live


class FakeDisplay:
  """Records what would go to the notebook: one output per handle, updated in place."""

  def __init__(self):
    self.outputs, self.calls = [], 0

  def __call__(self, data, handle):
    self.calls += 1
    if handle is None:
      self.outputs.append(data)
      return len(self.outputs) - 1
    self.outputs[handle] = data
    return handle


@pytest.fixture
def notebook(monkeypatch):
  fake = FakeDisplay()
  monkeypatch.setattr(live, 'in_notebook', lambda: True)
  monkeypatch.setattr(live, '_display', fake)
  return fake


def _history(steps, epochs):
  history = ft.History()
  for step in range(steps):
    history.record_step(step, {'loss': 1.0 / (step + 1), 'accuracy': step / steps})
  for epoch in range(epochs):
    history.record_epoch(epoch, {'train_loss': 0.5 / (epoch + 1), 'val_accuracy': 0.1 * epoch},
                         step=(epoch + 1) * steps // epochs)
  return history


def test_update_draws_the_history_and_replaces_one_output(notebook):
  plot = ft.LivePlot(('loss', 'accuracy'), min_interval=0)
  assert plot.update(_history(10, 2)) and plot.update(_history(20, 4))
  assert plot.redraws == 2
  assert len(notebook.outputs) == 1 and notebook.calls == 2  # redrawn in place
  assert notebook.outputs[0]['image/png'].startswith(b'\x89PNG')
  loss_ax, accuracy_ax = plot.axes
  step_line = loss_ax.get_lines()[0]
  np.testing.assert_array_equal(step_line.get_xdata(), np.arange(20))
  np.testing.assert_allclose(step_line.get_ydata(), 1.0 / np.arange(1, 21))
  np.testing.assert_allclose(accuracy_ax.get_lines()[-1].get_ydata(), [0.0, 0.1, 0.2, 0.3])
  assert len(loss_ax.get_lines()) == 2  # cleared before each redraw: step line and train epochs


def test_unforced_updates_are_rate_limited():
  plot = ft.LivePlot(('loss',), min_interval=3600)
  history = _history(5, 1)
  assert plot.update(history) is True
  assert plot.update(history) is False
  assert plot.update(history, force=True) is True
  assert plot.redraws == 2


def test_a_metric_not_recorded_yet_leaves_its_axes_blank():
  plot = ft.LivePlot(('loss', 'grad_norm'), min_interval=0)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # before an epoch ends, a missing metric is no mistake
    plot.update(_history(5, 0))
  assert plot.axes[1].get_lines() == [] and 'not recorded' in plot.axes[1].get_title()


def test_a_misspelled_metric_is_named_once_a_whole_epoch_was_recorded():
  plot = ft.LivePlot(('loss', 'acuracy'), min_interval=0)
  with pytest.warns(RuntimeWarning, match=r"nothing named 'acuracy' was recorded in a whole epoch; the recorded "
                                          r"metrics are \['accuracy', 'loss'\]. Did you mean 'accuracy'\?"):
    plot.update(_history(5, 1))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # once per metric, not at every redraw
    plot.update(_history(6, 2))
  assert 'not recorded' in plot.axes[1].get_title()
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # val_ and train_ metrics count under their plain names
    ft.LivePlot(('loss', 'accuracy'), min_interval=0).update(_history(5, 1))


@pytest.mark.parametrize('kwargs, match', [
    (dict(metrics='loss'), 'metrics: expected a non-empty sequence'),
    (dict(metrics=()), 'metrics: expected a non-empty sequence'),
    (dict(min_interval=-1), 'min_interval: expected a number >= 0'),
    (dict(metrics=('loss',), log_scale=('accuracy',)), 'log_scale: expected'),
    (dict(figsize=(0, 3)), r'figsize: expected \(width, height\) in inches, two numbers in \(0, 1000\), got \(0, 3\)'),
    (dict(figsize=(8,)), r'figsize: expected \(width, height\)'),
    (dict(figsize='big'), r"figsize: expected .* got 'big'"),
    (dict(figsize=(-4, 3)), r'figsize: expected'),
])
def test_liveplot_validates_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ft.LivePlot(**kwargs)


def test_update_rejects_a_non_history():
  with pytest.raises(TypeError, match='history: expected a flaxtrain.History'):
    ft.LivePlot().update({'loss': [1.0]})


def test_progress_bar_stores_its_final_state_as_text(notebook):
  bar = live.progress_bar(40, unit='step', mininterval=3600)  # throttled: only the first and last draw
  bar.set_description('epoch 2/2')
  for _ in range(40):
    bar.update(1)
  bar.close()
  assert len(notebook.outputs) == 1
  text = notebook.outputs[0]['text/plain']
  assert '100%' in text and '40/40' in text and 'epoch 2/2' in text, text
  assert '\r' not in text and '\n' not in text


def _fit(tmp_path=None, **kwargs):
  splits = ft.load_digits(seed=0)
  model = ft.MLP(64, [16], 10, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  return ft.fit(model, optimizer, ft.DataLoader(splits.train, 128, seed=0), epochs=3,
                val_loader=[splits.val], log_every=4, **kwargs)


def test_fit_redraws_the_live_plot_at_each_epoch_and_shows_the_final_history(notebook):
  plot = ft.LivePlot(('loss', 'accuracy'), min_interval=3600)  # the first log step, then epoch ends only
  history = _fit(live_plot=plot, progress=False)
  assert plot.redraws == 1 + 3
  np.testing.assert_allclose(plot.axes[1].get_lines()[-1].get_ydata(), history.epochs()['val_accuracy'])
  assert len(notebook.outputs) == 1


def test_fit_progress_in_a_notebook_ends_at_100_percent(notebook):
  _fit(progress=True)
  text = notebook.outputs[-1]['text/plain']
  assert '100%' in text and 'epoch 3/3' in text, text


def test_fit_rejects_a_bad_live_plot():
  with pytest.raises(TypeError, match='live_plot: expected'):
    _fit(live_plot='loss', progress=False)
