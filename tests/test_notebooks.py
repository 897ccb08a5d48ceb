"""Stored notebooks are executed, current and honest (see notebooks/README.md)."""

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))

import notebooks as nbtools  # noqa: E402

NOTEBOOKS = nbtools.notebooks([])


def test_there_are_notebooks():
  assert NOTEBOOKS, 'no numbered notebooks found in notebooks/'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_executed_and_current(path):
  assert nbtools.problems(path) == []


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_in_readme_index(path):
  readme = (ROOT / 'README.md').read_text()
  assert f'notebooks/{path.name}' in readme, f'{path.name} is missing from the README index'


def test_staleness_check_notices_a_changed_cell(tmp_path):
  """The check must fail when a cell changes after execution (it can fail)."""
  import nbformat
  source = NOTEBOOKS[0]
  nb = nbformat.read(source, as_version=4)
  assert nbtools.source_hash(nb) == nb.metadata['flaxtrain']['source_hash']
  nb.cells[-1].source += '\n# edited'
  copy = tmp_path / source.name
  nbformat.write(nb, copy)
  assert any('stale' in p for p in nbtools.problems(copy))


# Expected errors: the stored check and the live (nbval) check -------------------

def _cell(source, tags=(), error=None):
  import nbformat
  cell = nbformat.v4.new_code_cell(source, metadata={'tags': list(tags)})
  if error is not None:
    cell.outputs = [nbformat.v4.new_output('error', ename=error, evalue='boom', traceback=[])]
  return cell


@pytest.mark.parametrize('cell, fragment', [
    (_cell('# raises: ValueError\nf()', ['raises-exception'], 'ValueError'), None),
    (_cell('# raises: jax.errors.TracerBoolConversionError\nf()', ['raises-exception'],
           'TracerBoolConversionError'), None),
    (_cell('# raises: ValueError\nf()', ['raises-exception']), 'raised nothing'),
    (_cell('# raises: ValueError\nf()', ['raises-exception'], 'TypeError'), 'should raise ValueError'),
    (_cell('f()', ['raises-exception'], 'ValueError'), 'does not start with'),
    (_cell('f()', [], 'ValueError'), 'stored an error'),
    (_cell('# raises: ValueError\nf()', []), 'not tagged'),
], ids=['match', 'dotted-name', 'no-error', 'wrong-error', 'no-comment', 'untagged-error', 'untagged-comment'])
def test_exception_problems(cell, fragment):
  found = nbtools.exception_problems(cell)
  if fragment is None:
    assert found == []
  else:
    assert len(found) == 1 and fragment in found[0], found


def _run_nbval(tmp_path, cells):
  """Runs nbval with notebooks/conftest.py on a notebook made of ``cells``; returns (rc, output)."""
  import shutil
  import subprocess
  import nbformat
  nb = nbformat.v4.new_notebook(cells=cells)
  for count, cell in enumerate(cells, start=1):
    cell.execution_count = count
  nbformat.write(nb, tmp_path / 'nb.ipynb')
  shutil.copy(ROOT / 'notebooks' / 'conftest.py', tmp_path / 'conftest.py')
  done = subprocess.run(
      [sys.executable, '-m', 'pytest', '-o', 'addopts=', '-p', 'no:cacheprovider', '--nbval-lax',
       '--nbval-current-env', '--rootdir', str(tmp_path), str(tmp_path / 'nb.ipynb')],
      cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': str(ROOT / 'tools')})
  return done.returncode, done.stdout + done.stderr


def test_nbval_fails_a_raises_exception_cell_that_stops_raising(tmp_path):
  """Under re-execution, a cell that raises nothing or the wrong error fails; the right one passes."""
  rc, out = _run_nbval(tmp_path, [
      _cell('# raises: ZeroDivisionError\n1 / 0', ['raises-exception']),
      _cell('# raises: ZeroDivisionError\n1 / 1', ['raises-exception']),
      _cell("# raises: ZeroDivisionError\nint('x')", ['raises-exception']),
  ])
  assert rc != 0, out
  assert '1 passed' in out and '2 failed' in out, out
  assert 'raised nothing' in out and 'raised ValueError' in out, out


# Numbers in prose ---------------------------------------------------------------

def test_prose_numbers_picks_measured_looking_numbers():
  text = ('The step took 17.5 ms, 2.96x faster; accuracy 0.9833 (98%), over 3 epochs of 12 s. '
          'Setting `lr=0.1`, $\\beta = 0.9$, "10-100x" is a claim, jax 0.10.2, [a](x/1.5.md), 3x3 kernel.')
  assert nbtools.prose_numbers(text) == ['17.5', '2.96', '0.9833', '98', '12']


@pytest.mark.parametrize('number, text, expected', [
    ('2.96', 'speed-up: 2.96x', True),
    ('2.9', 'speed-up: 2.96x', False),
    ('2.96', 'speed-up: 12.96x', False),
    ('0.98', 'accuracy 0.98.', True),
    ('13', 'ratio 13.0x', False),
])
def test_appears_needs_the_whole_number(number, text, expected):
  assert nbtools.appears(number, text) is expected


def _numbers_notebook(markdown, printed, code='print(x)'):
  import nbformat
  cell = nbformat.v4.new_code_cell(code)
  cell.outputs = [nbformat.v4.new_output('stream', name='stdout', text=printed)]
  return nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell(markdown)])


def test_unmatched_numbers_catches_prose_that_differs_from_the_run():
  """The defect this check exists for: prose quoting 16.8 ms and 2.8x when the run printed others."""
  stale = _numbers_notebook('One step took 16.8 ms; jit was 2.8x faster.', 'step: 17.473 ms, speed-up 2.96x')
  found = nbtools.unmatched_numbers(stale)
  assert len(found) == 2 and 'quotes 16.8' in found[0] and 'quotes 2.8' in found[1], found
  honest = _numbers_notebook('One step took 17.473 ms; jit was 2.96x faster.', 'step: 17.473 ms, speed-up 2.96x')
  assert nbtools.unmatched_numbers(honest) == []


def test_unmatched_numbers_exempts_settings_and_quotations():
  nb = _numbers_notebook('With a rate of 0.05 the outline\'s "10-100x" did not hold.', 'speed-up 3.10x',
                         code='lr = 0.05')
  assert nbtools.unmatched_numbers(nb) == []


def test_problems_reports_a_prose_mismatch_in_a_stored_notebook(tmp_path):
  import nbformat
  source = NOTEBOOKS[0]
  nb = nbformat.read(source, as_version=4)
  nb.cells.append(nbformat.v4.new_markdown_cell('It took 123.456 ms.'))
  nb.metadata['flaxtrain']['source_hash'] = nbtools.source_hash(nb)
  copy = tmp_path / source.name
  nbformat.write(nb, copy)
  assert any('quotes 123.456' in p for p in nbtools.problems(copy))
