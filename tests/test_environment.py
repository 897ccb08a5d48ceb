"""One pinned environment: pyproject ranges, constraints.txt pins, environment.yml, Makefile, CI."""

import os
import pathlib
import re
import subprocess
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
BENCH_ONLY = {'bench'}  # benchmark-only extra: installed by `make bench`, not by set-up (see Makefile)


def direct_requirements():
  reqs = [Requirement(r) for r in PYPROJECT['dependencies']]
  for extra in PYPROJECT['optional-dependencies'].values():
    reqs += [Requirement(r) for r in extra]
  return {canonicalize_name(r.name): r for r in reqs}


def pins():
  found = {}
  for line in (ROOT / 'constraints.txt').read_text().splitlines():
    line = line.split('#')[0].strip()
    if line:
      name, version = line.split('==')
      found[canonicalize_name(name)] = Version(version)
  return found


def test_every_direct_dependency_is_pinned_exactly_once_within_its_range():
  reqs, pinned = direct_requirements(), pins()
  assert set(pinned) == set(reqs)
  for name, req in reqs.items():
    assert req.specifier.contains(pinned[name]), f'{name}=={pinned[name]} is outside {req.specifier}'


def test_the_versions_the_project_targets_are_the_pinned_ones():
  pinned = pins()
  assert {k: str(pinned[k]) for k in ('jax', 'jaxlib', 'flax', 'optax')} == {
      'jax': '0.10.2', 'jaxlib': '0.10.2', 'flax': '0.12.8', 'optax': '0.2.8'}


def extras_in(text):
  match = re.search(r'-e \.?\[([a-z,]+)\]', text) or re.search(r'-e "\.\[([a-z,]+)\]"', text)
  assert match, 'no editable install of the package with extras'
  return set(match.group(1).split(','))


def test_environment_yml_builds_the_same_environment():
  env = yaml.safe_load((ROOT / 'environment.yml').read_text())
  deps = env['dependencies']
  python = next(d for d in deps if isinstance(d, str) and d.startswith('python'))
  assert Version(python.split('=')[-1]) >= Version(PYPROJECT['requires-python'].lstrip('>='))
  assert 'pip' in deps
  pip_section = next(d['pip'] for d in deps if isinstance(d, dict))
  assert '-c constraints.txt' in pip_section
  assert extras_in(' '.join(pip_section)) == set(PYPROJECT['optional-dependencies']) - BENCH_ONLY
  named = {canonicalize_name(Requirement(d).name) for d in pip_section if not d.startswith('-')}
  assert named <= set(direct_requirements()), 'environment.yml names a package pyproject.toml does not'


def test_makefile_installs_the_same_pins_and_extras():
  makefile = (ROOT / 'Makefile').read_text()
  assert '-c constraints.txt' in makefile
  assert extras_in(makefile) == set(PYPROJECT['optional-dependencies']) - BENCH_ONLY  # the setup line
  assert '--sys-prefix' in makefile, 'the kernelspec must live inside the environment'


def test_the_bench_extra_is_for_make_bench_only():
  """Keras (a peer in benchmarks/) is installed by `make bench`, never by set-up; flaxtrain never needs it."""
  makefile = (ROOT / 'Makefile').read_text()
  bench_rule = re.search(r'^bench:.*?(?=^\S|\Z)', makefile, re.M | re.S).group(0)
  stamp = re.search(r'^bench: (\S+)', makefile, re.M).group(1)
  install = re.search(rf'^{re.escape(stamp)}:.*?\n((?:\t.*\n)+)', makefile, re.M).group(1)
  assert '-c constraints.txt' in install and extras_in(install) == BENCH_ONLY, bench_rule
  assert not any(canonicalize_name(Requirement(r).name) == 'keras' for r in PYPROJECT['dependencies'])
  imports = re.compile(r'^\s*(import|from)\s+keras\b', re.M)
  assert not [p.name for p in (ROOT / 'flaxtrain').rglob('*.py') if imports.search(p.read_text())]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / 'README.md').read_text()
  commands = re.findall(r'^\s*(make \w+)\s*$', readme, re.M)
  assert commands[:2] == ['make lab', 'make test'], 'README must show the two set-up commands first'
  ci = [line.strip() for line in (ROOT / '.ci' / 'run').read_text().splitlines()
        if line.strip() and not line.lstrip().startswith('#')]
  assert ci[-1] == 'make test'


def test_make_lab_defaults_are_the_documented_ones():
  """The hooks tests/test_browser.py uses (LAB_DIR, LAB_FLAGS) leave plain `make lab` unchanged."""
  env = {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MFLAGS', 'MAKELEVEL')}  # under `make test`
  lab = subprocess.run(['make', '-n', '--no-print-directory', '-o', '.venv/.flaxtrain-installed', 'lab'],
                       cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.split()
  # The explorers' pre-save hook (tools/jupyter) is put first on Jupyter's config path; nothing else comes before.
  assert lab[0] == f'JUPYTER_CONFIG_PATH="{ROOT}/tools/jupyter${{JUPYTER_CONFIG_PATH:+:$JUPYTER_CONFIG_PATH}}"'
  lab = lab[1:]
  assert lab[:2] == ['.venv/bin/jupyter', 'lab']
  assert set(lab[2:]) - {'--allow-root'} == {
      '--notebook-dir="notebooks"', '--ServerApp.ip=127.0.0.1', '--MappingKernelManager.default_kernel_name=flaxtrain'}


def test_ci_can_run_the_browser_tests():
  """CI installs Chromium before `make test` when missing; the `browser` marker is registered."""
  ci = (ROOT / '.ci' / 'run').read_text()
  install = re.search(r'if ! command -v chromium\b.*?apt-get install -y\b[^\n]*\bchromium\b.*?\nfi\n', ci, re.S)
  assert install and install.end() <= ci.rindex('make test'), 'CI must install chromium, when missing, before the tests'
  markers = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['pytest']['ini_options']['markers']
  assert any(m.startswith('browser:') for m in markers)
