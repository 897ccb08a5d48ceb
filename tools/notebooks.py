"""Execute the notebooks in place, and check that their stored outputs are current.

    python tools/notebooks.py execute notebooks/00_*.ipynb   # re-run, store outputs
    python tools/notebooks.py check                          # what tests/test_notebooks.py checks

A notebook is stored executed together with a hash of everything its outputs
depend on: the sources of its cells, the flaxtrain package and the pinned
versions. If any of those changes, the stored outputs are stale and the check
(and so CI) fails until the notebook is executed again. nbval then re-runs
each notebook in CI, so a notebook whose code no longer works fails too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import sys
import time

import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / 'notebooks'
KERNEL = 'flaxtrain'
NAME = re.compile(r'^\d\d_[a-z0-9_]+\.ipynb$')


def dependency_files() -> list[pathlib.Path]:
  """Files other than the notebook whose change makes stored outputs stale."""
  return sorted((ROOT / 'flaxtrain').rglob('*.py')) + [ROOT / 'constraints.txt']


def source_hash(nb: nbformat.NotebookNode) -> str:
  """sha256 over the notebook's cell sources and its dependency files."""
  digest = hashlib.sha256()
  for cell in nb.cells:
    digest.update(cell.cell_type.encode() + b'\0' + cell.source.encode() + b'\0')
  for path in dependency_files():
    digest.update(str(path.relative_to(ROOT)).encode() + b'\0' + path.read_bytes() + b'\0')
  return digest.hexdigest()


def execute(path: pathlib.Path, timeout: int = 900) -> float:
  """Executes ``path`` top to bottom in the flaxtrain kernel and stores it."""
  from nbclient import NotebookClient

  nb = nbformat.read(path, as_version=4)
  nb.metadata['kernelspec'] = {'name': KERNEL, 'display_name': 'Python (flaxtrain)', 'language': 'python'}
  env_backend = os.environ.pop('MPLBACKEND', None)  # keep the inline backend so plots are stored
  start = time.perf_counter()
  try:
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL, record_timing=False,
        resources={'metadata': {'path': str(path.parent)}},
    )
    client.execute()
  finally:
    if env_backend is not None:
      os.environ['MPLBACKEND'] = env_backend
  seconds = time.perf_counter() - start
  nb.metadata['flaxtrain'] = {'source_hash': source_hash(nb)}
  nbformat.write(nb, path)
  return seconds


def shown(path: pathlib.Path) -> pathlib.Path:
  """``path`` relative to the repository when it is inside it, as given otherwise."""
  return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def problems(path: pathlib.Path) -> list[str]:
  """Everything wrong with the stored notebook at ``path`` (empty if fine)."""
  found = []
  if not NAME.match(path.name):
    found.append(f'name {path.name!r} does not match NN_lowercase_words.ipynb')
  nb = nbformat.read(path, as_version=4)
  if nb.metadata.get('kernelspec', {}).get('name') != KERNEL:
    found.append(f'kernelspec is not {KERNEL!r}')
  stored = nb.metadata.get('flaxtrain', {}).get('source_hash')
  if stored != source_hash(nb):
    found.append(
        'stored outputs are stale (cells, flaxtrain or constraints.txt changed since it was '
        f'executed): run `make notebooks NB={shown(path)}`'
    )
  code = [c for c in nb.cells if c.cell_type == 'code' and c.source.strip()]
  counts = [c.get('execution_count') for c in code]
  if counts != list(range(1, len(code) + 1)):
    found.append(f'code cells were not executed once each, top to bottom: execution counts {counts}')
  for i, cell in enumerate(code):
    errors = [o for o in cell.get('outputs', []) if o.get('output_type') == 'error']
    expected = 'raises-exception' in cell.get('metadata', {}).get('tags', [])
    if errors and not expected:
      found.append(f'code cell {i + 1} stored an error: {errors[0].get("ename")}')
    if expected and not errors:
      found.append(f'code cell {i + 1} is tagged raises-exception but raised nothing')
  if not any(re.search(r'^\s*assert\b', c.source, re.M) for c in code):
    found.append('no assert: every claim must be checked on a measured value')
  return found


def notebooks(paths: list[str]) -> list[pathlib.Path]:
  if paths:
    return [pathlib.Path(p).resolve() for p in paths]
  return sorted(NOTEBOOKS.glob('[0-9][0-9]_*.ipynb'))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('command', choices=['execute', 'check'])
  parser.add_argument('paths', nargs='*', help='notebooks (default: all numbered notebooks)')
  args = parser.parse_args(argv)
  status = 0
  for path in notebooks(args.paths):
    if args.command == 'execute':
      print(f'executing {shown(path)} ...', flush=True)
      print(f'  done in {execute(path):.0f} s', flush=True)
    else:
      for problem in problems(path):
        print(f'{shown(path)}: {problem}')
        status = 1
  return status


if __name__ == '__main__':
  sys.exit(main())
