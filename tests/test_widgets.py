"""The explorers of flaxtrain.widgets, through their Python API: set a value, check what is computed and drawn."""

import pathlib

import jax
import jax.numpy as jnp
import nbformat
import numpy as np
import optax
import pytest

import flaxtrain as ft
from flaxtrain import widgets


def _on_steps(schedule, steps):
  """The schedule under jax.jit on int32 steps, as an optimizer evaluates it."""
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, dtype=jnp.int32)), dtype=np.float64)


# Learning-rate schedules.

def test_schedule_explorer_draws_and_prints_the_librarys_schedule():
  explorer = ft.widgets.schedule_explorer(1e-3, total_steps=500, warmup_steps=100, alpha=0.1,
                                          at_steps=(0, 50, 100, 499, 520))
  expected = ft.warmup_cosine(1e-3, 500, 100, alpha=0.1)
  steps = explorer.values['steps']
  assert steps[0] == 0 and steps[-1] >= 500
  np.testing.assert_allclose(explorer.values['rates'], _on_steps(expected, steps), rtol=1e-6, atol=1e-12)
  line = explorer.axes.get_lines()[0]
  np.testing.assert_array_equal(line.get_xdata(), steps)
  np.testing.assert_allclose(line.get_ydata(), explorer.values['rates'])
  rates_at = explorer.values['rates_at']
  np.testing.assert_allclose([rates_at[s] for s in (0, 50, 100, 499, 520)],
                             _on_steps(expected, [0, 50, 100, 499, 520]), rtol=1e-6, atol=1e-12)
  assert rates_at[520] == pytest.approx(1e-4, rel=1e-5)           # alpha * peak after the end
  assert '5.000e-04' in explorer.text and '1.000e-04' in explorer.text
  assert explorer.png.startswith(b'\x89PNG')


def test_moving_a_slider_redraws_with_the_new_setting():
  explorer = ft.widgets.schedule_explorer(1e-3, total_steps=500, warmup_steps=100, at_steps=(0, 100, 300))
  before_png, before_text = explorer.png, explorer.text
  explorer.controls['warmup_steps'].value = 200      # as the slider does
  assert explorer.settings['warmup_steps'] == 200 and explorer.message == ''
  np.testing.assert_allclose(explorer.values['rates'],
                             _on_steps(ft.warmup_cosine(1e-3, 500, 200), explorer.values['steps']),
                             rtol=1e-6, atol=1e-12)
  assert explorer.values['rates_at'][100] == pytest.approx(5e-4, rel=1e-5)   # halfway up the warmup now
  assert explorer.png != before_png and explorer.text != before_text
  assert explorer._image.value == explorer.png                              # the widget shows the new figure


def test_exponential_decay_and_staircase():
  explorer = ft.widgets.schedule_explorer(1e-3, total_steps=500, kind='exponential_decay',
                                          transition_steps=100, decay_rate=0.5, at_steps=(0, 150))
  assert explorer.values['rates_at'][150] == pytest.approx(1e-3 * 0.5 ** 1.5, rel=1e-5)
  assert explorer.controls['warmup_steps'].disabled and not explorer.controls['staircase'].disabled
  explorer.controls['staircase'].value = True
  assert explorer.values['rates_at'][150] == pytest.approx(5e-4, rel=1e-6)
  explorer.controls['kind'].value = 'warmup_cosine'
  assert not explorer.controls['warmup_steps'].disabled and explorer.controls['staircase'].disabled


def test_only_settings_that_change_the_schedule_recompute_it():
  explorer = ft.widgets.schedule_explorer(1e-3, total_steps=500, warmup_steps=100)
  assert explorer.computes == 1 and explorer.redraws == 1
  explorer.set(staircase=True, decay_rate=0.7)       # exponential-decay settings: the cosine is unchanged
  assert explorer.computes == 1 and explorer.redraws == 1
  explorer.set(alpha=0.2)
  assert explorer.computes == 2 and explorer.redraws == 2
  first = explorer.png
  explorer.set(alpha=0.0)                            # back to settings seen before: redrawn, not recomputed
  assert explorer.computes == 2 and explorer.redraws == 3 and explorer.png != first
  np.testing.assert_allclose(explorer.values['rates'],
                             _on_steps(ft.warmup_cosine(1e-3, 500, 100), explorer.values['steps']), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('setting, value, named', [
    ('warmup_steps', 600, 'warmup_steps'),            # longer than the run
    ('peak_value', -1e-3, 'peak_value'),
    ('alpha', 1.5, 'alpha'),
    ('total_steps', 0, 'total_steps'),
])
def test_bad_schedule_settings_show_a_message_and_keep_the_figure(setting, value, named):
  explorer = ft.widgets.schedule_explorer(1e-3, total_steps=500, warmup_steps=100)
  widget_message = explorer.widget.children[-3]
  good = (explorer.png, explorer.text, dict(explorer.settings))
  assert explorer.set(**{setting: value}) is False
  assert explorer.message.startswith(f'{named}:') and repr(value) in explorer.message
  assert named in widget_message.value                                   # shown in the widget
  assert (explorer.png, explorer.text, explorer.settings) == good        # the last good figure stays
  assert explorer.set(warmup_steps=50) and explorer.message == '' and widget_message.value == ''


def test_the_warmup_slider_ends_at_the_total_steps_so_no_slider_move_is_refused():
  explorer = ft.widgets.schedule_explorer(1e-3, total_steps=300, warmup_steps=100)
  warmup, total, alpha = (explorer.controls[k] for k in ('warmup_steps', 'total_steps', 'alpha'))
  assert warmup.max == 300 and total.max == 600
  warmup.value = 450                                   # past the end of its track: the slider stops at the total
  assert warmup.value == 300 and explorer.settings['warmup_steps'] == 300 and explorer.message == ''
  total.value = 50                                     # a run shorter than the warmup pulls the warmup down
  assert (explorer.settings['total_steps'], explorer.settings['warmup_steps']) == (50, 50)
  assert (warmup.value, warmup.max) == (50, 50) and explorer.message == ''
  total.value = 400
  assert warmup.max == 400 and warmup.value == 50
  alpha.value = 0.2                                    # every other slider keeps taking effect
  assert explorer.settings['alpha'] == 0.2 and explorer.message == ''
  np.testing.assert_allclose(explorer.values['rates'],
                             _on_steps(ft.warmup_cosine(1e-3, 400, 50, alpha=0.2), explorer.values['steps']),
                             rtol=1e-6, atol=1e-12)
  assert explorer.set(warmup_steps=500) is False      # the Python API still refuses, with the library's message
  assert explorer.message.startswith('warmup_steps: expected at most total_steps (400)')
  alpha.value = 0.3                                    # and a refused set() freezes no slider
  assert explorer.settings['alpha'] == 0.3 and explorer.message == ''
  assert explorer.set(total_steps=600, warmup_steps=550)   # both at once: the new range applies before the value
  assert (warmup.value, warmup.max) == (550, 600)
  explorer.controls['kind'].value = 'exponential_decay'
  assert explorer.set(peak_value=-1.0) is False
  assert explorer.message.startswith('peak_value:')     # the explorer's name, not the builder's init_value


def test_sliders_are_wide_enough_to_drag():
  import ipywidgets
  for explorer in (ft.widgets.schedule_explorer(), ft.widgets.clipping_explorer([0.5, 2.0]),
                   ft.widgets.optimizer_explorer(num_steps=5)):
    sliders = [c for c in explorer.controls.values()
               if isinstance(c, (ipywidgets.IntSlider, ipywidgets.FloatSlider, ipywidgets.FloatLogSlider))]
    assert sliders
    for slider in sliders:
      assert slider.layout.width == widgets.SLIDER_WIDTH and slider.style.description_width == widgets.DESCRIPTION_WIDTH
    assert int(widgets.SLIDER_WIDTH.removesuffix('px')) - int(widgets.DESCRIPTION_WIDTH.removesuffix('px')) >= 300


@pytest.mark.parametrize('kwargs, named', [
    (dict(warmup_steps=600), 'warmup_steps'),
    (dict(peak_value=-1.0), 'peak_value'),
    (dict(alpha=2.0), 'alpha'),
    (dict(decay_rate=1.5), 'decay_rate'),
    (dict(staircase='yes'), 'staircase'),
    (dict(at_steps=(0, -1)), 'at_steps'),
    (dict(at_steps=()), 'at_steps'),
    (dict(max_steps=100), 'max_steps'),
])
def test_schedule_explorer_validates_its_arguments(kwargs, named):
  with pytest.raises(ValueError, match=f'^{named}: expected'):
    ft.widgets.schedule_explorer(**kwargs)


def test_set_refuses_unknown_settings():
  with pytest.raises(ValueError, match='set: expected settings among'):
    ft.widgets.schedule_explorer().set(warmup=10)


# Gradient clipping.

def test_clipping_explorer_on_recorded_norms():
  norms = np.array([0.5, 2.0, 4.0, 1.0, 8.0])
  explorer = ft.widgets.clipping_explorer(norms, threshold=1.5)
  np.testing.assert_allclose(explorer.values['after'], [0.5, 1.5, 1.5, 1.0, 1.5], rtol=1e-6)
  assert explorer.values['fraction_clipped'] == pytest.approx(3 / 5)
  assert 'clipped at 60% of 5 steps' in explorer.text
  np.testing.assert_allclose(explorer.axes.get_lines()[1].get_ydata(), explorer.values['after'])
  before = explorer.png
  explorer.controls['threshold'].value = 3.0
  np.testing.assert_allclose(explorer.values['after'], [0.5, 2.0, 3.0, 1.0, 3.0], rtol=1e-6)
  assert explorer.values['fraction_clipped'] == pytest.approx(2 / 5) and explorer.png != before
  assert explorer.computes == 2


def test_clipping_explorer_takes_a_list_of_norms():
  explorer = ft.widgets.clipping_explorer([0.5, 2.0, 4.0], threshold=1.0)
  np.testing.assert_allclose(explorer.values['after'], [0.5, 1.0, 1.0], rtol=1e-6)


def test_clipping_explorer_on_stacked_gradients_matches_optax():
  grads = {'w': jax.random.normal(jax.random.key(0), (6, 3, 4)) * jnp.arange(1, 7)[:, None, None],
           'b': jax.random.normal(jax.random.key(1), (6, 4))}
  explorer = ft.widgets.clipping_explorer(grads, threshold=5.0)
  clip = optax.clip_by_global_norm(5.0)
  for t in range(6):
    step = jax.tree.map(lambda g: g[t], grads)
    clipped, _ = clip.update(step, clip.init(step))
    assert explorer.norms[t] == pytest.approx(float(optax.tree.norm(step)), rel=1e-6)
    assert explorer.values['after'][t] == pytest.approx(float(optax.tree.norm(clipped)), rel=1e-5)
  assert explorer.values['fraction_clipped'] == pytest.approx(np.mean(explorer.norms > 5.0))
  assert 0 < explorer.values['fraction_clipped'] < 1


def test_bad_threshold_shows_a_message_and_keeps_the_figure():
  explorer = ft.widgets.clipping_explorer(np.array([0.5, 2.0, 4.0]), threshold=1.0)
  good = (explorer.png, explorer.text)
  for bad in (0.0, -1.0, float('nan')):
    assert explorer.set(threshold=bad) is False
    assert explorer.message.startswith('threshold: expected a clip threshold > 0')
    assert (explorer.png, explorer.text) == good and explorer.computes == 1


@pytest.mark.parametrize('grads, threshold, named', [
    (np.array([1.0, np.nan]), 1.0, 'grads'),
    (np.array([1.0, -2.0]), 1.0, 'grads'),
    (np.array([]), 1.0, 'grads'),
    ({'w': np.ones((3, 2)), 'b': np.ones((4,))}, 1.0, 'grads'),   # step axes of different sizes
    ({'w': np.ones((3, 2), np.int32)}, 1.0, 'grads'),
    ({}, 1.0, 'grads'),
    (np.ones((3, 2)), 1.0, 'grads'),                                # stacked gradients as one bare array
    (np.array([1.0, 2.0]), 0.0, 'threshold'),
])
def test_clipping_explorer_validates_its_arguments(grads, threshold, named):
  with pytest.raises(ValueError, match=f'^{named}: expected'):
    ft.widgets.clipping_explorer(grads, threshold=threshold)


# Optimizers on a 2-D surface.

def _path_by_hand(tx, loss_fn, start, num_steps):
  w = jnp.asarray(start, jnp.float32)
  state, path = tx.init(w), [np.asarray(w)]
  for _ in range(num_steps):
    updates, state = tx.update(jax.grad(loss_fn)(w), state, w)
    w = optax.apply_updates(w, updates)
    path.append(np.asarray(w))
  return np.array(path)


def test_optimizer_paths_are_the_librarys_optimizers():
  explorer = ft.widgets.optimizer_explorer(num_steps=12, sgd_learning_rate=0.3, momentum=0.8,
                                           adam_learning_rate=0.05, b1=0.7, b2=0.99)
  start = explorer.start
  expected = {
      'SGD': ft.make_optimizer('sgd', 0.3),
      'momentum': ft.make_optimizer('sgd', 0.3, momentum=0.8),
      'Adam': ft.make_optimizer('adam', 0.05, b1=0.7, b2=0.99),
  }
  for name, tx in expected.items():
    np.testing.assert_allclose(explorer.paths[name], _path_by_hand(tx, widgets.ravine, start, 12),
                               rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(explorer._lines[name].get_xdata(), explorer.paths[name][:, 0])
    np.testing.assert_allclose(explorer.losses[name], [widgets.ravine(w) for w in explorer.paths[name]], rtol=1e-5)
  assert all(abs(p[-1]).sum() < abs(np.array(start)).sum() for p in explorer.paths.values())   # all went downhill


def test_only_paths_whose_settings_changed_are_recomputed_and_the_contour_is_kept():
  explorer = ft.widgets.optimizer_explorer(num_steps=20)
  contour, adam_path = explorer.contour, explorer.paths['Adam']
  assert explorer.computes == {'SGD': 1, 'momentum': 1, 'Adam': 1}
  explorer.controls['momentum'].value = 0.5
  assert explorer.computes == {'SGD': 1, 'momentum': 2, 'Adam': 1}
  explorer.controls['sgd_learning_rate'].value = 0.1
  assert explorer.computes == {'SGD': 2, 'momentum': 3, 'Adam': 1}
  explorer.set(b1=0.5)
  assert explorer.computes == {'SGD': 2, 'momentum': 3, 'Adam': 2}
  assert explorer.contour is contour and explorer.axes.collections.count(contour) == 1
  assert not np.array_equal(explorer.paths['Adam'], adam_path)
  np.testing.assert_allclose(
      explorer.paths['momentum'],
      _path_by_hand(ft.make_optimizer('sgd', 0.1, momentum=0.5), widgets.ravine, explorer.start, 20),
      rtol=1e-5, atol=1e-6)


def test_a_diverging_path_is_reported_not_raised():
  explorer = ft.widgets.optimizer_explorer(num_steps=200)
  assert explorer.set(sgd_learning_rate=0.9)            # 0.9 * curvature 4 > 2: SGD diverges across the valley
  assert 'SGD       after 200 steps: diverged' in explorer.text and explorer.message == ''
  assert np.all(np.isfinite(explorer._lines['SGD'].get_ydata()))


@pytest.mark.parametrize('setting, value', [
    ('sgd_learning_rate', -0.1), ('adam_learning_rate', 0.0), ('momentum', 1.0), ('b1', -0.1), ('b2', 1.0),
])
def test_bad_optimizer_settings_show_a_message(setting, value):
  explorer = ft.widgets.optimizer_explorer(num_steps=10)
  good, computes = explorer.png, dict(explorer.computes)
  assert explorer.set(**{setting: value}) is False
  assert explorer.message.startswith(f'{setting}: expected') and repr(value) in explorer.message
  assert explorer.png == good and explorer.computes == computes


@pytest.mark.parametrize('kwargs, named', [
    (dict(loss_fn='ravine'), 'loss_fn'),
    (dict(loss_fn=lambda w: w), 'loss_fn'),                    # not a scalar
    (dict(loss_fn=lambda w: jnp.log(w[0])), 'loss_fn'),        # NaN at the start
    (dict(start=(9.0, 0.0)), 'start'),
    (dict(num_steps=0), 'num_steps'),
    (dict(extent=(1.0, -1.0, 0.0, 1.0)), 'extent'),
    (dict(momentum=1.2), 'momentum'),
    (dict(sgd_learning_rate=0.0), 'sgd_learning_rate'),
])
def test_optimizer_explorer_validates_its_arguments(kwargs, named):
  with pytest.raises(ValueError, match=f'^{named}: expected'):
    ft.widgets.optimizer_explorer(**kwargs)


# Display: a live widget with a widget front end, a static image without one.

def test_without_a_widget_front_end_the_explorer_shows_a_png_and_prints_its_values(monkeypatch, capsys):
  shown = []
  monkeypatch.setattr(widgets, '_widget_frontend', lambda: False)
  monkeypatch.setattr('IPython.display.display', lambda data, raw=False: shown.append(data))
  explorer = ft.widgets.schedule_explorer()
  explorer._ipython_display_()
  assert len(shown) == 1 and set(shown[0]) == {'image/png', 'text/plain'}
  assert shown[0]['image/png'] == explorer.png
  printed = capsys.readouterr().out
  assert explorer.text in printed and widgets.STATIC_NOTE in printed
  assert explorer._ui is None                     # no widget was created, so none is stored


def test_with_a_widget_front_end_the_explorer_is_a_widget_with_a_png_fallback(monkeypatch, capsys):
  shown = []
  monkeypatch.setattr(widgets, '_widget_frontend', lambda: True)
  monkeypatch.setattr('IPython.display.display',
                      lambda data, raw=False, metadata=None: shown.append(data) or shown.append(metadata))
  explorer = ft.widgets.clipping_explorer(np.array([0.5, 2.0, 4.0]))
  explorer._ipython_display_()
  assert len(shown) == 2 and shown[1] == {'flaxtrain': {'print_when_saved': f'{explorer.text}\n{widgets.SAVED_NOTE}'}}
  assert shown[0]['application/vnd.jupyter.widget-view+json']['model_id'] == explorer.widget.model_id
  assert shown[0]['image/png'] == explorer.png and capsys.readouterr().out == ''
  assert shown[0]['text/plain'] == f'{explorer.text}\n{widgets.SAVED_NOTE}'   # the values, wherever text is shown


# Saving: `make lab` keeps an explorer's static image in the file, not a widget view that cannot show later.

def _server_config():
  import runpy

  import traitlets.config
  config = traitlets.config.Config()
  path = pathlib.Path(__file__).parent.parent / 'tools' / 'jupyter' / 'jupyter_server_config.py'
  namespace = runpy.run_path(str(path), init_globals={'get_config': lambda: config})
  return config, namespace['keep_static_fallbacks']


def test_make_lab_saves_an_explorer_as_its_static_image():
  config, hook = _server_config()
  assert config.ContentsManager.pre_save_hook is hook
  view = {'version_major': 2, 'version_minor': 0, 'model_id': 'abc'}
  explorer = {'output_type': 'display_data', 'metadata': {'flaxtrain': {'print_when_saved': 'values\nnote'}},
              'data': {'application/vnd.jupyter.widget-view+json': view, 'image/png': 'iVBOR', 'text/plain': 'values'}}
  other = {'output_type': 'display_data', 'metadata': {},
           'data': {'application/vnd.jupyter.widget-view+json': dict(view), 'image/png': 'iVBOR', 'text/plain': 'x'}}
  progress = {'output_type': 'display_data', 'metadata': {},
              'data': {'application/vnd.jupyter.widget-view+json': dict(view), 'text/plain': 'HBox()'}}
  stream = {'output_type': 'stream', 'name': 'stdout', 'text': 'hi'}
  model = {'type': 'notebook', 'content': {'cells': [
      {'cell_type': 'markdown', 'source': 'x'},
      {'cell_type': 'code', 'source': '', 'outputs': [explorer, progress, stream, other]}]}}
  assert hook(model, path='x.ipynb', contents_manager=None) == 2
  outputs = model['content']['cells'][1]['outputs']
  assert outputs[0] is explorer and explorer == {'output_type': 'display_data', 'metadata': {},   # the fallback only
                                                 'data': {'image/png': 'iVBOR', 'text/plain': 'values'}}
  assert outputs[1] == {'output_type': 'stream', 'name': 'stdout', 'text': 'values\nnote\n'}   # printed below it
  assert outputs[2:] == [progress, stream, other] and 'application/vnd.jupyter.widget-view+json' not in other['data']
  assert 'application/vnd.jupyter.widget-view+json' in progress['data'] and stream['text'] == 'hi'
  assert hook({'type': 'file', 'content': 'text'}) == 0 and hook({'type': 'notebook', 'content': None}) == 0


def test_make_lab_passes_the_server_config():
  import subprocess
  root = pathlib.Path(__file__).parent.parent
  command = subprocess.run(['make', '-n', '-o', '.venv/.flaxtrain-installed', 'lab'], cwd=root, capture_output=True,
                           text=True, check=True).stdout
  assert f'JUPYTER_CONFIG_PATH="{root}/tools/jupyter' in command and 'jupyter lab' in command, command


def test_widget_front_end_is_a_jupyter_server_session(monkeypatch):
  monkeypatch.setattr(widgets, 'in_notebook', lambda: True)
  monkeypatch.delenv('JPY_SESSION_NAME', raising=False)
  assert not widgets._widget_frontend()                 # nbclient: no server session
  monkeypatch.setenv('JPY_SESSION_NAME', '/notebooks/03_optimizers.ipynb')
  assert widgets._widget_frontend()                     # a kernel JupyterLab started
  monkeypatch.setattr(widgets, 'in_notebook', lambda: False)
  assert not widgets._widget_frontend()                 # a script


@pytest.mark.parametrize('name, explorer', [
    ('03_optimizers.ipynb', 'optimizer_explorer'),
    ('04_learning_rate_schedules.ipynb', 'schedule_explorer'),
    ('05_gradient_clipping.ipynb', 'clipping_explorer'),
])
def test_stored_notebook_keeps_a_static_image_of_its_explorer(name, explorer):
  """A code host cannot run widgets: the stored explorer cell holds a PNG and the printed values, no widget."""
  nb = nbformat.read(pathlib.Path(__file__).parent.parent / 'notebooks' / name, as_version=4)
  cells = [c for c in nb.cells if c.cell_type == 'code' and f'ft.widgets.{explorer}(' in c.source]
  assert len(cells) == 1, f'{name}: expected one cell calling ft.widgets.{explorer}'
  outputs = cells[0].outputs
  rich = [o for o in outputs if 'data' in o]
  assert len(rich) == 1 and set(rich[0].data) == {'image/png', 'text/plain'}, [list(o.get('data', {})) for o in outputs]
  printed = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert widgets.STATIC_NOTE in printed and len(printed.strip().splitlines()) >= 2
