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
    found += [f'code cell {i + 1} {p}' for p in exception_problems(cell)]
  found += unmatched_numbers(nb)
  if not any(re.search(r'^\s*assert\b', c.source, re.M) for c in code):
    found.append('no assert: every claim must be checked on a measured value')
  return found


# Expected errors -------------------------------------------------------------

RAISES = re.compile(r'#\s*raises:\s*([A-Za-z_][\w.]*)\s*$')


def expected_exception(cell: nbformat.NotebookNode) -> str | None:
  """The exception named by the cell's first-line comment ``# raises: Name``, if any."""
  lines = cell.source.lstrip('\n').splitlines()
  match = RAISES.match(lines[0].strip()) if lines else None
  return match.group(1) if match else None


def exception_matches(expected: str, ename: str | None) -> bool:
  """True if the error name a kernel reported is the expected one (``jax.errors.X`` matches ``X``)."""
  return ename is not None and expected.rsplit('.', 1)[-1] == ename


def exception_problems(cell: nbformat.NotebookNode) -> list[str]:
  """What is wrong with the stored error (or its absence) of one code cell.

  A cell tagged ``raises-exception`` must start with ``# raises: Name`` and
  must have stored an error named ``Name``; a cell without the tag must not
  have stored an error, nor carry the comment.
  """
  errors = [o for o in cell.get('outputs', []) if o.get('output_type') == 'error']
  tagged = 'raises-exception' in cell.get('metadata', {}).get('tags', [])
  expected = expected_exception(cell)
  if not tagged:
    if errors:
      return [f'stored an error: {errors[0].get("ename")}']
    if expected:
      return [f'says `# raises: {expected}` but is not tagged raises-exception']
    return []
  if expected is None:
    return ['is tagged raises-exception but does not start with a comment `# raises: ExceptionName`']
  if not errors:
    return [f'is tagged raises-exception (`# raises: {expected}`) but raised nothing']
  if not exception_matches(expected, errors[0].get('ename')):
    return [f'should raise {expected} but stored {errors[0].get("ename")}: {errors[0].get("evalue", "")[:200]}']
  return []


# Numbers in prose ------------------------------------------------------------
#
# A number in a markdown cell that looks measured (it has decimals, or a unit
# such as x, %, ms or s follows it) must appear verbatim in a stored output of
# the same notebook, so that the prose cannot drift from the run it describes.
# Not measurements, and so not checked: numbers in inline code or code blocks,
# in $math$, inside quotation marks ("10-100x": someone else's claim), in
# links, in versions (0.10.2, Flax 0.11), in heading numbers, and numbers that
# appear in a code cell's source (settings such as a learning rate of 0.1).

_NUMBER = r'(?<![\w.])(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.]*\d)'
_UNIT = r'(?:x|×|%|ms|µs|μs|us|ns|s|sec|seconds|min|minutes|[KMG]i?B)(?![\w])'
MEASURED = re.compile(_NUMBER + r'(?=\s?' + _UNIT + r')|(?<![\w.])(\d+\.\d+(?:[eE][-+]?\d+)?)(?![\w.]*\d)')
_NOT_PROSE = [
    re.compile(r'```.*?```', re.S),              # fenced code
    re.compile(r'`[^`\n]*`'),                    # inline code
    re.compile(r'\$\$.*?\$\$|\$[^$\n]*\$', re.S),  # math
    re.compile(r'"[^"\n]*"|“[^”\n]*”'),         # quoted claims
    re.compile(r'\]\([^)\s]*\)|<https?://[^>]*>|https?://\S+'),  # link targets
    re.compile(r'^#+\s*[\d.]+', re.M),            # heading numbers
    re.compile(r'\d+(?:\.\d+){2,}'),              # versions
    re.compile(r'\b(?:[Ff]lax|JAX|jax|jaxlib|[Oo]ptax|[Oo]rbax|NumPy|numpy|[Pp]ython|versions?)\s+v?\d+(?:\.\d+)*'),
]


def prose_numbers(markdown: str) -> list[str]:
  """The numbers in ``markdown`` that look measured (see the comment above)."""
  for pattern in _NOT_PROSE:
    markdown = pattern.sub(' ', markdown)
  return [a or b for a, b in MEASURED.findall(markdown)]


def output_text(cell: nbformat.NotebookNode) -> str:
  """All text a code cell stored: streams, text results and error messages."""
  parts = []
  for out in cell.get('outputs', []):
    if out.get('output_type') == 'stream':
      parts.append(out.get('text', ''))
    elif out.get('output_type') == 'error':
      parts.append(f'{out.get("ename", "")}: {out.get("evalue", "")}')
    else:
      data = out.get('data', {})
      parts += [data[m] for m in ('text/plain', 'text/markdown', 'text/html') if m in data]
  return '\n'.join(p if isinstance(p, str) else ''.join(p) for p in parts)


def appears(number: str, text: str) -> bool:
  """True if ``number`` occurs in ``text`` as a whole number (2.9 is not in 2.96 or 12.9)."""
  return re.search(r'(?<![\d.])' + re.escape(number) + r'(?![\d]|\.\d)', text) is not None


def unmatched_numbers(nb: nbformat.NotebookNode) -> list[str]:
  """Measured-looking numbers in markdown cells that no stored output contains."""
  code = [c for c in nb.cells if c.cell_type == 'code']
  outputs = '\n'.join(output_text(c) for c in code)
  sources = '\n'.join(c.source for c in code)
  found = []
  for index, cell in enumerate(nb.cells):
    if cell.cell_type != 'markdown':
      continue
    for number in prose_numbers(cell.source):
      if not appears(number, outputs) and not appears(number, sources):
        found.append(
            f'cell {index + 1} (markdown) quotes {number}, which no stored output prints: quote '
            'the stored run, print the number in the form quoted, or mark a quotation with "..."'
        )
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
