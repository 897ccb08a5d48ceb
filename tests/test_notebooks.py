"""Stored notebooks are executed, current and honest (see notebooks/README.md)."""

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
