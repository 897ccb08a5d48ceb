"""JupyterLab in a real browser, as a learner uses it: `make lab`, headless Chromium, the notebooks.

Select with `-m browser`, leave out with `-m "not browser"`. Needs Chromium (`apt-get install chromium`)
and Playwright (a pinned test dependency). Under CI=true they must run; elsewhere they skip, saying
how to install Chromium. Screenshots go to $FLAXTRAIN_SCREENSHOTS, else a pytest temporary directory;
the path is printed when the tests start.
"""

import os
import pathlib
import re
import time
import tomllib

import nbformat
import pytest

import _jupyterlab as jl

pytestmark = pytest.mark.browser

RUN_ALL = ['00_anatomy_of_a_training_loop.ipynb', '08_complete_training_loop.ipynb']
STORED = sorted(p.name for p in jl.NOTEBOOKS.glob('[0-9][0-9]_*.ipynb'))
RUN_TIMEOUT = 600  # seconds for Run All of one notebook; nbval allows 900 per cell


@pytest.fixture(scope='module')
def lab(chromium, tmp_path_factory):
  server = jl.Lab(tmp_path_factory.mktemp('lab'))
  try:
    server.start()
    yield server
  finally:
    left = server.stop()
    assert not left, f'processes of the test\'s JupyterLab still running after shutdown: {left}'


@pytest.fixture
def page(browser, lab):
  context = browser.new_context(viewport={'width': 1400, 'height': 900})
  context.set_default_timeout(120_000)
  try:
    yield context.new_page()
  finally:
    context.close()
    lab.shut_down_sessions()  # every test starts with no kernel running
    lab.reset()  # and with the notebooks as stored


def notebook(lab, name):
  """The notebook as the test's JupyterLab serves it (copied when the tests started)."""
  return nbformat.read(lab.notebook_dir / name, as_version=4)


def assert_plots_loaded(page, nb, where, screenshots=None, prefix=''):
  """Every cell shows as many plots as the stored notebook has, each a loaded image."""
  jl.load_images(page)
  shown = jl.cells(page)
  for i, (cell, stored) in enumerate(zip(shown, nb.cells)):
    expected = jl.stored_images(stored)
    assert len(cell['images']) == expected, (
        f'{where}: cell {i} shows {len(cell["images"])} images, the stored notebook has {expected}')
    broken = [img for img in cell['images'] if not (img['complete'] and img['width'] > 0)]
    assert not broken, f'{where}: cell {i} has plots that did not load: {broken}'
    if screenshots and expected:
      jl.screenshot(page, i, screenshots / f'{prefix}-cell{i:02d}.png')
  return shown


def assert_progress_final(shown, nb, where):
  """Cells that showed a progress bar show one now, and every reading is a run's final state."""
  for i, (cell, stored) in enumerate(zip(shown, nb.cells)):
    text = '\n'.join(o['text'] for o in cell['outputs'])
    if stored.cell_type == 'code' and jl.has_progress(stored):
      assert jl.PROGRESS.search(jl.normalized(text)), f'{where}: cell {i} shows no progress: {text[:300]!r}'
    assert not jl.progress_problems(text), f'{where}: cell {i}: {jl.progress_problems(text)}'
    for broken in ('Error displaying widget', 'Loading widget'):
      assert broken not in text, f'{where}: cell {i} shows {broken!r} instead of its output'


def assert_kernel_is_the_projects(page, lab, path):
  shown = jl.status(page)
  assert shown['kernel'] == jl.DISPLAY_NAME, f'{path}: toolbar shows kernel {shown["kernel"]!r}'
  assert shown['status'].startswith(f'{jl.DISPLAY_NAME} |'), f'{path}: status bar shows {shown["status"]!r}'
  assert lab.kernel_state(path)[0] == jl.KERNEL
  assert lab.api('kernelspecs')['kernelspecs'][jl.KERNEL]['spec']['display_name'] == jl.DISPLAY_NAME


@pytest.mark.parametrize('name', RUN_ALL)
def test_run_all_cells_in_jupyterlab(page, lab, screenshots, name):
  """Run > Run All Cells on a fresh kernel: no unexpected error, plots loaded, the last output as stored."""
  nb = notebook(lab, name)
  stem = name.split('_')[0]
  jl.open_notebook(page, lab, name, len(nb.cells))
  assert nb.metadata['kernelspec']['display_name'] == jl.DISPLAY_NAME
  assert_kernel_is_the_projects(page, lab, name)

  jl.menu(page, 'Edit', 'Clear Outputs of All Cells')
  assert not any(c['outputs'] for c in jl.cells(page)), 'outputs left after Clear Outputs of All Cells'
  jl.menu(page, 'Run', 'Run All Cells')
  executed = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code' and c.source.strip()]
  try:
    jl.wait_for_idle(page, lab, name, executed, timeout=RUN_TIMEOUT)
  finally:
    page.screenshot(path=screenshots / f'{stem}-run-all-end.png')
  assert_kernel_is_the_projects(page, lab, name)

  ran = jl.save(page, lab, name)
  for i in executed:
    errors = [o for o in ran.cells[i].outputs if o.output_type == 'error']
    if 'raises-exception' in nb.cells[i].metadata.get('tags', []):
      assert errors, f'{name}: cell {i} is tagged raises-exception but showed no error'
    else:
      assert not errors, f'{name}: cell {i} showed {errors[0].ename}: {errors[0].evalue}'

  shown = assert_plots_loaded(page, nb, f'{name} after Run All', screenshots, f'{stem}-run')
  assert_progress_final(shown, nb, f'{name} after Run All')
  last = max(i for i in executed if jl.stored_text(nb.cells[i]))
  assert jl.masked(jl.shown_text(shown[last])) == jl.masked(jl.stored_text(nb.cells[last])), (
      f'{name}: the last cell with output (cell {last}) printed\n{jl.shown_text(shown[last])}\n'
      f'but the stored notebook has\n{jl.stored_text(nb.cells[last])}')


def test_new_notebook_from_the_launcher_has_flaxtrain(page, lab, screenshots):
  """Launcher > Python (flaxtrain): the README's example runs, and imports this checkout's flaxtrain."""
  page.goto(lab.url('lab?reset=1'))
  page.locator('.jp-LauncherCard[data-category="Notebook"]', has_text=jl.DISPLAY_NAME).click()
  page.wait_for_selector(f'{jl.PANEL} .jp-Notebook .jp-Cell')
  path = lab.new_session(timeout=120)
  jl.wait_for_idle(page, lab, path, executed=[], timeout=180)
  assert_kernel_is_the_projects(page, lab, path)

  example = jl.readme_example(jl.ROOT / 'README.md')
  check = 'import sys\nprint(sys.prefix)\nprint(ft.__file__)\nprint(ft.__version__)'
  for i, code in enumerate([example, check]):
    page.locator(f'{jl.PANEL} .jp-Notebook .jp-Cell').nth(i).locator('.cm-content').click()
    page.keyboard.insert_text(code)
    page.keyboard.press('Shift+Enter')
  jl.wait_for_idle(page, lab, path, executed=[0, 1], timeout=RUN_TIMEOUT)
  jl.screenshot(page, 0, screenshots / 'launcher-example.png')
  jl.screenshot(page, 1, screenshots / 'launcher-check.png')

  ran = jl.save(page, lab, path)
  for i in (0, 1):
    errors = [o for o in ran.cells[i].outputs if o.output_type == 'error']
    assert not errors, f'cell {i} of the new notebook showed {errors[0].ename}: {errors[0].evalue}'
  shown = jl.cells(page)
  version = tomllib.loads((jl.ROOT / 'pyproject.toml').read_text())['project']['version']
  expected = f'{jl.ROOT / ".venv"}\n{jl.ROOT / "flaxtrain" / "__init__.py"}\n{version}\n'
  assert jl.shown_text(shown[1]) == expected
  if re.search(r'\bplot', example):
    assert jl.load_images(page) >= 1, "the README's example plots, but the notebook shows no image"
    images = jl.cells(page)[0]['images']
    assert images and all(img['complete'] and img['width'] > 0 for img in images), images


@pytest.mark.parametrize('name', STORED)
def test_stored_notebook_as_a_reader_sees_it(page, lab, screenshots, name):
  """A stored notebook opened without running anything: its plots, and progress at each run's end."""
  nb = notebook(lab, name)
  stem = name.split('_')[0]
  jl.open_notebook(page, lab, name, len(nb.cells))
  page.screenshot(path=screenshots / f'{stem}-stored-top.png')
  shown = assert_plots_loaded(page, nb, f'{name} as stored')
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code' and jl.has_progress(cell):
      jl.screenshot(page, i, screenshots / f'{stem}-stored-progress-cell{i:02d}.png')
  assert_progress_final(shown, nb, f'{name} as stored')


EXPLORER = '03_optimizers.ipynb'  # its explorer cell needs only the first code cell before it

# The image of the first explorer on the page, as bytes (base64), and the text of its values.
EXPLORER_JS = """async (cell) => {
  const img = cell.querySelector('.jp-OutputArea-output .widget-image');
  const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
  let text = '';
  for (const b of bytes) text += String.fromCharCode(b);
  return {src: img.src, png: btoa(text), values: cell.querySelector('.widget-html pre').textContent};
}"""


def test_explorer_redraws_when_a_slider_moves(page, lab, screenshots):
  """An explorer run in JupyterLab is a live widget, shown once: a key on a slider redraws it."""
  nb = notebook(lab, EXPLORER)
  explorer = next(i for i, c in enumerate(nb.cells)
                  if c.cell_type == 'code' and 'ft.widgets.optimizer_explorer(' in c.source)
  first = next(i for i, c in enumerate(nb.cells) if c.cell_type == 'code')
  assert jl.stored_images(nb.cells[explorer]) == 1, 'the stored notebook keeps a static image of the explorer'
  jl.open_notebook(page, lab, EXPLORER, len(nb.cells))
  jl.menu(page, 'Edit', 'Clear Outputs of All Cells')
  for i in (first, explorer):
    page.locator(f'{jl.PANEL} .jp-Notebook .jp-Cell').nth(i).locator('.cm-content').click()
    page.keyboard.press('Control+Enter')
  jl.wait_for_idle(page, lab, EXPLORER, executed=[first, explorer], timeout=RUN_TIMEOUT)
  cell = page.locator(f'{jl.PANEL} .jp-Notebook .jp-Cell').nth(explorer)
  cell.locator('.widget-image').wait_for(timeout=60_000)
  shown = jl.cells(page)[explorer]
  assert len(shown['outputs']) == 1 and 'SGD rate' in shown['outputs'][0]['text'], shown['outputs']  # the widget
  assert len(shown['images']) == 1, f'the live explorer shows {len(shown["images"])} images, not one'
  before = cell.evaluate(EXPLORER_JS)
  assert before['png'] and 'SGD ' in before['values']
  jl.screenshot(page, explorer, screenshots / 'explorer-before.png')

  slider = cell.locator('.widget-slider', has_text='SGD rate')
  rate_before = slider.locator('.widget-readout').inner_text()
  slider.locator('.noUi-handle').focus()
  for _ in range(4):
    page.keyboard.press('ArrowRight')
  deadline = time.monotonic() + 60
  while (after := cell.evaluate(EXPLORER_JS))['src'] == before['src'] or after['values'] == before['values']:
    assert time.monotonic() < deadline, f'no redraw within 60 s of moving the slider: {after["values"]}'
    time.sleep(0.5)
  jl.wait_for_idle(page, lab, EXPLORER, executed=[first, explorer], timeout=60)
  after = cell.evaluate(EXPLORER_JS)
  jl.screenshot(page, explorer, screenshots / 'explorer-after.png')
  assert after['png'] != before['png'], 'the figure did not change when the slider moved'
  sgd = [line for line in after['values'].splitlines() if line.startswith('SGD ')]
  assert sgd and sgd != [line for line in before['values'].splitlines() if line.startswith('SGD ')], (
      f"the SGD values did not change:\n{before['values']}\n->\n{after['values']}")
  assert float(slider.locator('.widget-readout').inner_text()) > float(rate_before)
  assert not cell.locator('.widget-html span').count(), 'the explorer shows a message after a valid move'


SLIDER_TRACKS_JS = """(cell) => Array.from(cell.querySelectorAll('.widget-slider .noUi-target')).map(
    t => Math.round(t.getBoundingClientRect().width))"""


def run_explorer_cell(page, lab, name, call, needs=()):
  """Opens ``name``, clears its outputs, runs its first code cell, the cells that define ``needs`` and the cell
  calling ``call``; returns the explorer cell's index."""
  nb = notebook(lab, name)
  code = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code']
  explorer = next(i for i in code if call in nb.cells[i].source)
  run = [code[0]] + [next(i for i in code if need in nb.cells[i].source) for need in needs] + [explorer]
  jl.open_notebook(page, lab, name, len(nb.cells))
  jl.menu(page, 'Edit', 'Clear Outputs of All Cells')
  for i in run:
    page.locator(f'{jl.PANEL} .jp-Notebook .jp-Cell').nth(i).locator('.cm-content').click()
    page.keyboard.press('Control+Enter')
  jl.wait_for_idle(page, lab, name, executed=run, timeout=RUN_TIMEOUT)
  page.locator(f'{jl.PANEL} .jp-Notebook .jp-Cell').nth(explorer).locator('.widget-image').wait_for(timeout=60_000)
  return explorer


def test_explorer_run_saved_and_reopened_shows_its_static_image(page, lab, screenshots):
  """Run the explorer, save, shut the kernel down, reopen: the saved image shows, not "model not found"."""
  explorer = run_explorer_cell(page, lab, EXPLORER, 'ft.widgets.optimizer_explorer(')
  cell = page.locator(f'{jl.PANEL} .jp-Notebook .jp-Cell').nth(explorer)
  tracks = cell.evaluate(SLIDER_TRACKS_JS)
  assert len(tracks) == 5 and min(tracks) >= 250, f'slider tracks {tracks} px wide: too short to drag finely'
  jl.screenshot(page, explorer, screenshots / 'explorer-live-before-save.png')

  saved = jl.save(page, lab, EXPLORER)
  kept = [(o.output_type, sorted(o.get('data', {}))) for o in saved.cells[explorer].outputs]
  assert kept == [('display_data', ['image/png', 'text/plain']), ('stream', [])], (
      f'the saved explorer cell holds {kept}, not its static image and its printed values')
  printed = saved.cells[explorer].outputs[1].text
  assert printed.startswith('SGD ') and 'run the cell again to move the sliders' in printed, printed

  lab.shut_down_sessions()                 # the kernel that held the widget is gone
  jl.open_notebook(page, lab, EXPLORER, len(saved.cells))
  jl.load_images(page)
  shown = jl.cells(page)[explorer]
  jl.screenshot(page, explorer, screenshots / 'explorer-reopened-after-save.png')
  text = ' '.join(o['text'] for o in shown['outputs'])
  assert 'Error displaying widget' not in text and 'Loading widget' not in text, text
  assert jl.shown_text(shown) == printed, f'the reopened cell prints {jl.shown_text(shown)!r}, not its values'
  assert len(shown['images']) == 1 and shown['images'][0]['complete'] and shown['images'][0]['width'] > 0, shown


def test_schedule_explorer_warmup_slider_ends_at_the_total_steps(page, lab, screenshots):
  """In the browser, the warmup slider's end follows the total steps: no move reaches a refused setting."""
  name = '04_learning_rate_schedules.ipynb'
  explorer = run_explorer_cell(page, lab, name, 'ft.widgets.schedule_explorer(', needs=('PEAK = ', 'ALPHA = '))
  cell = page.locator(f'{jl.PANEL} .jp-Notebook .jp-Cell').nth(explorer)
  warmup = cell.locator('.widget-slider', has_text='warmup steps')
  warmup.locator('.noUi-handle').focus()
  page.keyboard.press('End')                 # the far end of the warmup track
  total = cell.locator('.widget-slider', has_text='total steps').locator('.widget-readout').inner_text()
  deadline = time.monotonic() + 60
  while warmup.locator('.widget-readout').inner_text() != total:
    assert time.monotonic() < deadline, (f'the warmup slider ends at {warmup.locator(".widget-readout").inner_text()},'
                                         f' not at the total steps {total}')
    time.sleep(0.5)
  jl.wait_for_idle(page, lab, name, executed=[explorer], timeout=60)
  jl.screenshot(page, explorer, screenshots / 'schedule-explorer-warmup-at-end.png')
  assert not cell.locator('.widget-html span').count(), 'the explorer shows a message after a move its range allows'


# The checks themselves, on text a page can show (no browser needed).

@pytest.mark.parametrize('text, problem', [
    ('  0%|          | 0/1344 [00:00<?, ?step/s]', 'at 0%'),
    ('epoch\u20071/8:\u2007\u20070%\u20070/1344\u2007[00:00<?,\u2007?step/s]', 'at 0%'),
    (' 41%|####      | 550/1344 [00:00<?, ?step/s]', 'as it was created'),
    ('epoch 8/8: 100%|##########| 1344/1344 [00:13<00:00, 96.90step/s, loss=0.0128]', None),
    ('epoch 4/8:  44%|####4     | 588/1344 [00:13<00:17, 42.39step/s, val_acc=0.9917]', None),
])
def test_progress_check_accepts_only_a_runs_final_state(text, problem):
  assert jl.PROGRESS.search(jl.normalized(text))
  found = jl.progress_problems(text)
  assert (problem in found[0]) if problem else not found, found


def test_output_comparison_ignores_numbers_and_temporary_paths_only():
  stored = 'test accuracy 0.9689 at /tmp/tmpx1/run after  40 epochs\n'
  assert jl.masked(stored) == jl.masked('test accuracy 0.97 at /tmp/tmpq9/run after 41 epochs')
  assert jl.masked(stored) != jl.masked('test loss 0.9689 at /tmp/tmpx1/run after 40 epochs')


def test_readme_example_is_found(tmp_path):
  readme = tmp_path / 'README.md'
  readme.write_text('# x\n## Using flaxtrain here\n\ntext\n```python\nimport flaxtrain as ft\n```\n## Next\n')
  assert jl.readme_example(readme) == 'import flaxtrain as ft\n'
  assert 'import flaxtrain' in jl.readme_example(jl.ROOT / 'README.md')
