"""The benchmark script keeps working and checks what it claims to check.

No timing is asserted here (timings belong to ``make bench``): a quick run
must produce every variant on every workload, with the same losses as the
pure JAX floor, and a JSON file in the documented schema; and the harness's
own checks (loss agreement, targets) must catch what they exist to catch.
"""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def bench():
  spec = importlib.util.spec_from_file_location('benchmarks_run', ROOT / 'benchmarks' / 'run.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope='module')
def quick_results(bench, tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'results.json'
  status = bench.main(['--quick', '--out', str(out)])
  return status, json.loads(out.read_text())


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_succeeds_and_every_variant_agrees_with_pure_jax(bench, quick_results):
  status, results = quick_results
  assert status == 0
  assert results['schema'] == bench.SCHEMA and results['quick'] is True
  assert results['all_losses_agree'] is True
  assert set(results['workloads']) == set(bench.WORKLOADS)
  for name, workload in results['workloads'].items():
    assert set(workload['variants']) == set(bench.VARIANTS), name
    for variant, r in workload['variants'].items():
      where = f'{name}/{variant}'
      assert r['loss_agrees'] is True, (where, r['max_loss_diff'])
      assert r['max_loss_diff'] <= bench.LOSS_ATOL + bench.LOSS_RTOL * 3, where  # losses are ~2.3
      assert all(_positive(r[k]) for k in ('us_per_step', 'steps_per_s', 'first_call_s', 'ratio')), where
      assert math.isclose(r['steps_per_s'] * r['us_per_step'], 1e6, rel_tol=1e-9), where
    # Every step variant was checked over the K warm-up steps; the loops over whole epochs.
    k = workload['many_k']
    assert all(workload['variants'][v]['checked_steps'] == k for v in bench.STEP_VARIANTS), name
    epoch_steps = workload['steps_per_epoch'] * workload['fit_epochs_per_call']
    assert all(workload['variants'][v]['checked_steps'] == epoch_steps for v in bench.LOOP_VARIANTS), name
    assert workload['variants']['pure_jax']['ratio'] == 1.0
    assert workload['variants']['pure_loop']['ratio'] == 1.0


def test_quick_run_reports_donation_float_cost_versions_and_targets(bench, quick_results):
  _, results = quick_results
  for key in ('jax', 'flax', 'optax', 'backend', 'cpu_count'):
    assert results['versions'][key] not in (None, '')
  for name, workload in results['workloads'].items():
    assert set(workload['float_loss_cost']) == {'pure_jax', 'flaxtrain_step'}
    assert all(_positive(v) for v in workload['float_loss_cost'].values())
    donation = workload['donation']
    state = donation['state_bytes']
    # Donating the parameters and optimizer state lets XLA alias them (at least their size) to
    # the outputs; without donation nothing is aliased.
    assert donation['pure_jax']['alias_size_bytes'] >= state, name
    assert donation['pure_jax_not_donated']['alias_size_bytes'] == 0, name
    assert donation['flaxtrain_step']['alias_size_bytes'] >= state, name
    assert donation['pure_jax']['peak_memory_bytes'] < donation['pure_jax_not_donated']['peak_memory_bytes']
  expected = {(t[0], t[1]) for t in bench.TARGETS}
  assert {(t['name'], t['workload']) for t in results['targets']} == expected
  for t in results['targets']:
    assert _positive(t['measured']) and t['op'] in ('<=', '>=')
    assert t['met'] == (t['measured'] <= t['limit'] if t['op'] == '<=' else t['measured'] >= t['limit'])
  assert results['all_targets_met'] == all(t['met'] for t in results['targets'])


def test_targets_are_the_issue_targets(bench):
  """The targets may be tightened, never loosened, without changing this test."""
  limits = {(t[0], t[1]): (t[4], t[5]) for t in bench.TARGETS}
  assert limits[('step_vs_pure', 'tiny_mlp')] == ('<=', 1.00)
  assert limits[('step_vs_pure', 'mlp')] == ('<=', 1.05)
  assert limits[('step_vs_pure', 'cnn')] == ('<=', 1.05)
  assert limits[('fit_vs_pure_loop', 'tiny_mlp')] == ('<=', 1.05)
  assert limits[('many_speedup_vs_pure', 'tiny_mlp')] == ('>=', 4.0)
  assert limits[('many_speedup_vs_outline', 'tiny_mlp')] == ('>=', 25.0)
  for workload in ('tiny_mlp', 'mlp'):  # many() scans here: it must be faster than single steps
    assert limits[('many_vs_single', workload)] == ('<=', 1.00)
  # On the CNN many() runs the single step's computation in a loop (see SAME_SPEED): a tie, so
  # "never slower" is checked within the issue's 1.05x band for "as fast as".
  assert limits[('many_vs_single', 'cnn')] == ('<=', 1.05)


def test_check_targets_flags_a_miss_in_either_direction(bench):
  def workload(**us):
    return {'variants': {name: {'us_per_step': value} for name, value in us.items()}}

  good = dict(pure_jax=100.0, flaxtrain_step=99.0, flaxtrain_many=20.0, outline_loop=900.0, fit=104.0,
              pure_loop=100.0)
  checked = {(t['name'], t['workload']): t for t in bench.check_targets({'tiny_mlp': workload(**good)})}
  assert all(t['met'] for t in checked.values())
  assert len(checked) == sum(t[1] == 'tiny_mlp' for t in bench.TARGETS)  # other workloads: not run, not checked
  slow_step = bench.check_targets({'tiny_mlp': workload(**{**good, 'flaxtrain_step': 101.0})})
  assert [t['name'] for t in slow_step if not t['met']] == ['step_vs_pure']
  slow_many = bench.check_targets({'tiny_mlp': workload(**{**good, 'flaxtrain_many': 40.0})})
  assert {t['name'] for t in slow_many if not t['met']} == {'many_speedup_vs_pure', 'many_speedup_vs_outline'}


def test_measure_catches_a_variant_that_trains_differently(bench):
  """The loss check is not vacuous: a step with another learning rate is reported as disagreeing."""
  workload = bench.WORKLOADS['tiny_mlp']
  data = bench.load_data(workload)

  def make(name):
    rate = {'pure_jax': 1e-3, 'other_rate': 2e-3}[name]
    return bench.pure_jax(workload.make_model(), optax.adam(rate), data)

  results = bench.measure(['pure_jax', 'other_rate'], make, warmup_steps=4, steps=4, rounds=1)
  assert results['pure_jax']['loss_agrees'] and results['pure_jax']['max_loss_diff'] == 0.0
  assert not results['other_rate']['loss_agrees']
  assert results['other_rate']['checked_steps'] == 4
  assert np.isfinite(results['other_rate']['max_loss_diff'])
