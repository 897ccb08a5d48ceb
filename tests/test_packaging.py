"""flaxtrain as a user installs it: a wheel in a fresh environment outside the repository, public APIs only."""

import ast
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'flaxtrain'
SOURCES = sorted(PACKAGE.rglob('*.py'))
# Private hooks of Flax, JAX, optax, orbax and Python that the package once used, and must not.
FORBIDDEN = re.compile(r'(?<![A-Za-z0-9])(_raw_value|_unsafe_bypass_check|pytreelib|_pytree__state|getrefcount|'
                       r'_control_comm)\b')
LIBRARIES = ('flax', 'jax', 'optax', 'orbax', 'ipywidgets', 'jaxlib')


def test_the_package_names_no_private_hook_of_its_dependencies():
  found = [f'{path.relative_to(ROOT)}:{n}: {line.strip()}' for path in SOURCES
           for n, line in enumerate(path.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
  assert found == []


@pytest.mark.parametrize('path', SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_private_name(path):
  """No `from jax._src import ...`, `from orbax... import _x`, nor `from flaxtrain.x import _y` across modules.

  A package's ``__init__`` may import its own private submodules (``flaxtrain.exercises._nb01``).
  """
  tree = ast.parse(path.read_text())
  bad = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      top = node.module.split('.')[0]
      private_module = any(part.startswith('_') for part in node.module.split('.'))
      if top in LIBRARIES and private_module:
        bad.append(f'from {node.module} import ...')
      own_package = node.module == '.'.join(path.relative_to(ROOT).with_suffix('').parts[:-1])
      if top in (*LIBRARIES, 'flaxtrain') and not own_package and any(
          alias.name.startswith('_') and not alias.name.startswith('__') for alias in node.names):
        bad.append(f'from {node.module} import {", ".join(a.name for a in node.names)}')
    elif isinstance(node, ast.Import):
      bad += [f'import {a.name}' for a in node.names
              if a.name.split('.')[0] in LIBRARIES and any(p.startswith('_') for p in a.name.split('.'))]
  assert bad == []


CACHE_TYPES = {'dict', 'WeakKeyDictionary', 'WeakValueDictionary', 'OrderedDict', 'defaultdict', 'lru_cache', 'cache'}
# Module-level tables that are filled once, at import, and never grow while the package runs.
TABLES = {('exercises/_core.py', 'REGISTRY')}  # the @exercise decorators register each exercise once


@pytest.mark.parametrize('path', SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_level_cache(path):
  """State passed as a value: no module-level dict that fills up as the package runs, no lru_cache."""
  tree = ast.parse(path.read_text())
  bad = []
  for node in tree.body:
    value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    if any((str(path.relative_to(PACKAGE)), getattr(t, 'id', None)) in TABLES for t in targets):
      continue
    if isinstance(value, ast.Dict) and not value.keys:
      bad.append(f'line {node.lineno}: an empty dict at module level')
    elif isinstance(value, ast.Call) and getattr(value.func, 'attr', getattr(value.func, 'id', None)) in CACHE_TYPES:
      bad.append(f'line {node.lineno}: a {ast.unparse(value.func)}() at module level')
    if isinstance(node, ast.FunctionDef):
      for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if getattr(target, 'attr', getattr(target, 'id', None)) in ('lru_cache', 'cache'):
          bad.append(f'line {node.lineno}: @{ast.unparse(decorator)} on {node.name}')
  assert bad == []


def test_the_wheel_lists_every_subpackage():
  """pyproject's package list covers every folder with an __init__.py (a plain `pip install .` sees them)."""
  text = (ROOT / 'pyproject.toml').read_text()
  assert re.search(r'^\[tool\.setuptools\.packages\.find\]\s*\ninclude = \["flaxtrain", "flaxtrain\.\*"\]', text, re.M)


@pytest.mark.skipif(os.environ.get('FLAXTRAIN_SKIP_WHEEL') == '1', reason='FLAXTRAIN_SKIP_WHEEL=1')
def test_the_built_wheel_installs_into_a_fresh_environment_and_runs_the_readme_example(tmp_path):
  """Build the wheel, install it with its pinned dependencies into a new venv outside the repo, run the README."""
  dist = tmp_path / 'dist'
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w', str(dist),
                  str(ROOT)], check=True, cwd=tmp_path, timeout=600)
  wheels = list(dist.glob('flaxtrain-*.whl'))
  assert len(wheels) == 1
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=300)
  python = venv / 'bin' / 'python'
  subprocess.run([str(python), '-m', 'pip', 'install', '-q', '--disable-pip-version-check', '-c',
                  str(ROOT / 'constraints.txt'), str(wheels[0])], check=True, cwd=tmp_path, timeout=900)
  example = _readme_example()
  script = tmp_path / 'example.py'
  script.write_text('import matplotlib\nmatplotlib.use("Agg")\n' + example
                    + '\nimport flaxtrain, pathlib\nprint("FROM", pathlib.Path(flaxtrain.__file__).parent)\n'
                    + 'print("EXERCISES", len(flaxtrain.exercises.ids()))\n')
  run = subprocess.run([str(python), str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                       env={k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')})
  assert run.returncode == 0, run.stderr[-3000:]
  installed = pathlib.Path(run.stdout.split('FROM ')[1].split()[0])
  assert venv in installed.parents, f'imported from {installed}, not the fresh environment'
  assert int(run.stdout.split('EXERCISES ')[1].split()[0]) >= 24


def _readme_example() -> str:
  """The README's first python block: the quick-start a new user copies."""
  readme = (ROOT / 'README.md').read_text()
  block = re.search(r'## Using flaxtrain in your own notebook\s+```python\n(.*?)```', readme, re.S)
  assert block, 'README lost its quick-start example'
  return textwrap.dedent(block.group(1))
