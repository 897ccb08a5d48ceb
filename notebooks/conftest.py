"""Makes nbval fail a ``raises-exception`` cell that no longer raises what it says.

nbval lets a cell tagged ``raises-exception`` pass whether or not it raises.
Our cells name the error they demonstrate on their first line,
``# raises: ExceptionName`` (see notebooks/README.md); after nbval has run
such a cell, this hook fails the test unless the cell raised exactly that.
"""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / 'tools'))

import notebooks as nbtools  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  result = yield
  options = getattr(item, 'options', None)
  if options is None or not options.get('check_exception') or not hasattr(item, 'test_outputs'):
    return result
  expected = nbtools.expected_exception(item.cell)
  if expected is None:
    raise AssertionError(
        'cell is tagged raises-exception but does not start with `# raises: ExceptionName`')
  errors = [o for o in item.test_outputs or [] if o.get('output_type') == 'error']
  if not errors:
    raise AssertionError(f'cell should raise {expected} (`# raises: {expected}`) but raised nothing')
  if not nbtools.exception_matches(expected, errors[0].get('ename')):
    raise AssertionError(
        f'cell should raise {expected} but raised {errors[0].get("ename")}: {errors[0].get("evalue")}')
  return result
