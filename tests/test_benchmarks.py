"""The benchmark scripts keep working and check what they claim to check.

No timing is asserted here (timings belong to ``make bench``): a quick run
must produce every variant on every workload, with the same losses as the
pure JAX floor, every part run in its own process (Keras as a peer when the
``[bench]`` extra is installed, a fresh process per variant, many fit calls),
and a JSON file in the documented schema; and the harness's own checks (loss
agreement, targets, the fixed-cost arithmetic, the many-fits bounds) must
catch what they exist to catch.
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
HAS_KERAS = importlib.util.find_spec('keras') is not None


def _load(name, filename):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / filename)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def bench():
  try:
    yield _load('benchmarks_run', 'run.py')
  finally:
    sys.modules.pop('benchmarks_run', None)


@pytest.fixture(scope='module')
def many_fits():
  try:
    yield _load('benchmarks_many_fits', 'many_fits.py')
  finally:
    sys.modules.pop('benchmarks_many_fits', None)


@pytest.fixture(scope='module')
def quick_results(bench, tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'results.json'
  status = bench.main(['--quick', '--out', str(out)])
  return status, json.loads(out.read_text())


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _count(x):
  return isinstance(x, (int, float)) and x >= 0 and float(x).is_integer()


def test_quick_run_succeeds_and_every_variant_agrees_with_pure_jax(bench, quick_results):
  status, results = quick_results
  assert status == 0
  assert results['schema'] == bench.SCHEMA and results['quick'] is True
  assert results['all_losses_agree'] is True
  assert set(results['workloads']) == set(bench.WORKLOADS)
  for name, workload in results['workloads'].items():
    quick_variants = set(bench.STEP_VARIANTS) | set(bench.loop_variants(name, quick=True))
    assert quick_variants >= {'pure_loop', 'fit', 'fit_many'} and set(workload['variants']) == quick_variants, name
    for variant, r in workload['variants'].items():
      where = f'{name}/{variant}'
      assert r['loss_agrees'] is True and r['losses_finite'] is True, (where, r['max_loss_diff'])
      assert r['max_loss_diff'] <= bench.LOSS_ATOL + bench.LOSS_RTOL * 3, where  # losses are ~2.3
      assert all(_positive(r[k]) for k in ('us_per_step', 'steps_per_s', 'first_call_s', 'ratio')), where
      assert math.isclose(r['steps_per_s'] * r['us_per_step'], 1e6, rel_tol=1e-9), where
      assert _count(r['warmup_compilations']) and r['compilations_per_timed_call'] >= 0, where
    # Every step variant was checked over the K warm-up steps; the loops over whole calls.
    k = workload['many_k']
    assert all(workload['variants'][v]['checked_steps'] == k for v in bench.STEP_VARIANTS), name
    epoch_steps = workload['steps_per_epoch'] * workload['fit_epochs_per_call']
    for v in quick_variants & set(bench.LOOP_VARIANTS):
      assert workload['variants'][v]['checked_steps'] == epoch_steps, (name, v)
      assert workload['variants'][v]['ratio_to'] == bench.RATIO_TO[v]
    assert workload['variants']['pure_jax']['ratio'] == 1.0
    assert workload['variants']['pure_loop']['ratio'] == 1.0
    # The first call of each variant compiles its step in this process, and the counter sees it.
    assert workload['variants']['pure_loop']['warmup_compilations'] >= 1, name
    assert workload['setup_ms_per_call'] is None  # needs the 1-epoch variants of a full run


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
    # flaxtrain's step, where it exposes lower(): reported, whether it donates or not (whether it must
    # is for the step's own tests to say, not the benchmark's).
    if donation['flaxtrain_step'] is not None:
      aliased = donation['flaxtrain_step']['alias_size_bytes']
      assert aliased == 0 or aliased >= state, name  # donates all of its state or none of it
      assert _positive(donation['flaxtrain_step']['peak_memory_bytes']), name
    assert donation['pure_jax']['peak_memory_bytes'] < donation['pure_jax_not_donated']['peak_memory_bytes']
  expected = {(t[0], t[1]) for t in bench.TARGETS} | {(t[0], t[1]) for t in bench.OTHER_TARGETS}
  assert {(t['name'], t['workload']) for t in results['targets']} == expected
  for t in results['targets']:
    assert t['op'] in ('<=', '>=')
    if t['measured'] is None:  # Keras's, where the [bench] extra is missing; memory growth, in 3 calls
      assert not t['met']
      if t['name'] == 'many_fits_rss_growth_mb':
        assert 'call 20' in t['note']
      else:
        assert not HAS_KERAS and t['workload'] in ('keras', 'fresh') and 'keras' in t['note']
      continue
    assert _count(t['measured']) if t['name'].endswith('compilations') else _positive(t['measured'])
    assert t['met'] == (t['measured'] <= t['limit'] if t['op'] == '<=' else t['measured'] >= t['limit'])
  assert results['all_targets_met'] == all(t['met'] for t in results['targets'])


def test_quick_run_measures_keras_as_a_peer_in_its_own_process(quick_results):
  keras = quick_results[1]['parts']['keras']
  if not HAS_KERAS:
    assert 'keras' in keras['skipped'] and '[bench]' in keras['skipped']
    return
  assert keras['exit_status'] == 0 and keras['problems'] == []
  assert keras['backend'] == 'jax'
  assert set(keras['variants']) == {'pure_loop', 'fit', 'fit_many', 'keras', 'keras_many'}
  for name, r in keras['variants'].items():
    assert _positive(r['us_per_step']) and _positive(r['ratio']), name
  assert keras['variants']['fit']['loss_agrees'] is True
  assert keras['variants']['keras']['checked_steps'] == 0  # Keras initializes its own way: not compared
  assert set(keras['ratios']) == {'fit_vs_keras', 'fit_many_vs_keras_many'}
  assert all(_positive(v) for v in keras['ratios'].values())


def test_quick_run_times_a_trained_model_in_fresh_processes(quick_results):
  fresh = quick_results[1]['parts']['fresh']
  assert fresh['exit_status'] == 0 and fresh['problems'] == []
  variants = {'flaxtrain', 'pure'} | ({'keras'} if HAS_KERAS else set())
  assert set(fresh['medians']) == variants == set(fresh['runs'])
  for name, m in fresh['medians'].items():
    assert all(_positive(m[k]) for k in ('total_s', 'build_s', 'fit_s')), name
    assert math.isclose(m['total_s'], m['build_s'] + m['fit_s'], rel_tol=0.05), name
    # A fresh process has compiled nothing yet: its fit compiles at least the train step.
    assert m['fit_compilations'] >= 1 and _positive(m['fit_compile_s']), name
  assert _positive(fresh['ratios']['flaxtrain_vs_pure'])
  assert (fresh['ratios']['flaxtrain_vs_keras'] is not None) == HAS_KERAS


def test_quick_run_calls_fit_on_new_models_in_one_process(quick_results):
  many = quick_results[1]['parts']['many_fits']
  assert many['exit_status'] == 0 and many['calls'] == 3 and many['enforced'] is False
  assert len(many['compilations_per_call']) == 3 and many['first_call_compilations'] >= 1
  assert many['compilations_after_first'] == sum(many['compilations_per_call'][1:])
  assert set(many['rss_mb']) == {'1', '2', '3'} and all(_positive(v) for v in many['rss_mb'].values())
  assert many['rss_growth_mb'] is None  # fewer calls than the base call of the memory bound
  assert many['all_losses_finite'] is True


def test_markdown_table_renders_every_section(bench, quick_results):
  table = bench.markdown_table(quick_results[1])
  for name in bench.WORKLOADS:
    assert f'| {name} |' in table
  assert 'fresh process' in table and '`fit` calls on new models' in table
  assert ('Keras 3 as a peer' in table) == HAS_KERAS


def test_targets_are_the_issue_targets(bench):
  """The targets may be tightened, never loosened, without changing this test."""
  limits = {(t[0], t[1]): (t[4], t[5]) for t in bench.TARGETS}
  limits.update({(t[0], t[1]): (t[2], t[3]) for t in bench.OTHER_TARGETS})
  # The step on Flax's public API: dispatch-bound on the tiny MLP, as fast as pure JAX elsewhere.
  assert limits[('step_vs_pure', 'tiny_mlp')] == ('<=', 1.50)
  assert limits[('step_vs_pure', 'mlp')] == ('<=', 1.05)
  assert limits[('step_vs_pure', 'cnn')] == ('<=', 1.05)
  assert limits[('fit_vs_pure_loop', 'tiny_mlp')] == ('<=', 1.02)
  assert limits[('fit_vs_pure_loop', 'mlp')] == ('<=', 1.02)
  assert limits[('fit_fresh_vs_pure_loop', 'tiny_mlp')] == ('<=', 1.02)
  assert limits[('fit_fresh_compilations', 'tiny_mlp')] == ('<=', 0)
  assert limits[('fit_many_vs_pure_loop', 'tiny_mlp')] == ('<=', 0.40)
  assert limits[('many_speedup_vs_pure', 'tiny_mlp')] == ('>=', 4.0)
  assert limits[('many_speedup_vs_outline', 'tiny_mlp')] == ('>=', 25.0)
  for workload in ('tiny_mlp', 'mlp'):  # many() scans here: it must be faster than single steps
    assert limits[('many_vs_single', workload)] == ('<=', 1.00)
  # On the CNN many() runs the single step's computation in a loop (see SAME_SPEED): a tie, so
  # "never slower" is checked within the issue's 1.05x band for "as fast as".
  assert limits[('many_vs_single', 'cnn')] == ('<=', 1.05)
  assert limits[('fit_vs_keras', 'keras')] == ('<=', 0.50)
  assert limits[('fit_many_vs_keras_many', 'keras')] == ('<=', 0.50)
  assert limits[('fresh_fit_vs_keras', 'fresh')] == ('<=', 1.00)
  assert limits[('many_fits_compilations', 'many_fits')] == ('<=', 0)
  assert limits[('many_fits_rss_growth_mb', 'many_fits')] == ('<=', 50.0)


def test_a_full_run_times_every_loop_variant_on_every_workload(bench):
  for name in bench.WORKLOADS:
    assert bench.loop_variants(name, quick=False) == list(bench.LOOP_VARIANTS)
  # A quick run still exercises every loop's code once (the 1-epoch variants are its plain ones).
  assert set(bench.loop_variants('tiny_mlp', quick=True)) == set(bench.LOOP_VARIANTS) - set(bench.ONE_EPOCH_VARIANTS)


def _workload(**us):
  return {'variants': {name: {'us_per_step': value} for name, value in us.items()}}


GOOD_TINY = dict(pure_jax=100.0, flaxtrain_step=120.0, flaxtrain_many=20.0, outline_loop=900.0, fit=101.0,
                 fit_fresh=101.5, fit_many=35.0, pure_loop=100.0)


def test_check_targets_flags_a_miss_in_either_direction(bench):
  checked = {(t['name'], t['workload']): t for t in bench.check_targets({'tiny_mlp': _workload(**GOOD_TINY)})}
  assert all(t['met'] for t in checked.values())
  assert len(checked) == sum(t[1] == 'tiny_mlp' for t in bench.TARGETS)  # other workloads: not run, not checked
  slow_step = bench.check_targets({'tiny_mlp': _workload(**{**GOOD_TINY, 'flaxtrain_step': 151.0})})
  assert [t['name'] for t in slow_step if not t['met']] == ['step_vs_pure']
  slow_fit = bench.check_targets({'tiny_mlp': _workload(**{**GOOD_TINY, 'fit': 103.0, 'fit_fresh': 103.0})})
  assert {t['name'] for t in slow_fit if not t['met']} == {'fit_vs_pure_loop', 'fit_fresh_vs_pure_loop'}
  slow_many = bench.check_targets({'tiny_mlp': _workload(**{**GOOD_TINY, 'flaxtrain_many': 40.0, 'fit_many': 41.0})})
  assert {t['name'] for t in slow_many if not t['met']} == {
      'many_speedup_vs_pure', 'many_speedup_vs_outline', 'fit_many_vs_pure_loop'}


def test_check_targets_reads_the_other_parts_and_flags_what_they_miss(bench):
  tiny = _workload(**GOOD_TINY)
  tiny['variants']['fit_fresh']['compilations_per_timed_call'] = 0.0
  parts = {'keras': {'ratios': {'fit_vs_keras': 0.4, 'fit_many_vs_keras_many': 0.45}},
           'fresh': {'ratios': {'flaxtrain_vs_keras': 0.9}},
           'many_fits': {'compilations_after_first': 0, 'rss_growth_mb': 12.0}}
  checked = bench.check_targets({'tiny_mlp': tiny}, parts)
  assert {(t['name'], t['workload']) for t in checked} >= {(t[0], t[1]) for t in bench.OTHER_TARGETS}
  assert all(t['met'] for t in checked)
  tiny['variants']['fit_fresh']['compilations_per_timed_call'] = 1.0  # a new model compiled again
  bad = {'keras': {'ratios': {'fit_vs_keras': 0.6, 'fit_many_vs_keras_many': 0.45}},
         'fresh': {'ratios': {'flaxtrain_vs_keras': 1.2}},
         'many_fits': {'compilations_after_first': 199, 'rss_growth_mb': 350.0}}
  missed = {t['name'] for t in bench.check_targets({'tiny_mlp': tiny}, bad) if not t['met']}
  assert missed == {'fit_fresh_compilations', 'fit_vs_keras', 'fresh_fit_vs_keras', 'many_fits_compilations',
                    'many_fits_rss_growth_mb'}
  # Keras missing: its targets are listed as not measured, with the reason, and not met.
  skipped = {'keras': {'skipped': bench.KERAS_MISSING}, 'fresh': {'ratios': {'flaxtrain_vs_keras': None},
                                                                 'note': 'keras is not installed'}}
  unmeasured = [t for t in bench.check_targets({}, skipped)]
  assert {t['name'] for t in unmeasured} == {'fit_vs_keras', 'fit_many_vs_keras_many', 'fresh_fit_vs_keras'}
  assert all(t['measured'] is None and not t['met'] and 'keras' in t['note'] for t in unmeasured)


def test_setup_cost_is_read_from_one_epoch_against_whole_calls(bench):
  """A call of e epochs costs F + e*S*a: F comes back from the two medians per step."""
  fixed_us, step_us, steps, epochs = 2000.0, 100.0, 33, 10
  loops = {}
  for long, short, fixed in (('pure_loop', 'pure_loop_1epoch', 0.0), ('fit', 'fit_1epoch', fixed_us)):
    loops[short] = {'us_per_step': (fixed + steps * step_us) / steps}
    loops[long] = {'us_per_step': (fixed + epochs * steps * step_us) / (epochs * steps)}
  cost = bench.setup_cost_ms(loops, epochs, steps)
  assert cost['pure_loop'] == pytest.approx(0.0, abs=1e-9)
  assert cost['fit'] == pytest.approx(2.0)
  assert bench.setup_cost_ms(loops, 1, steps) is None


def test_many_fits_bounds(many_fits):
  result = {'compilations_after_first': 0, 'rss_growth_mb': 49.0, 'rss_growth_limit_mb': many_fits.RSS_GROWTH_MB}
  assert many_fits.met(result) == {'no_recompilation': True, 'flat_memory': True}
  assert many_fits.met({**result, 'compilations_after_first': 1})['no_recompilation'] is False
  assert many_fits.met({**result, 'rss_growth_mb': 51.0})['flat_memory'] is False
  assert many_fits.met({**result, 'rss_growth_mb': None})['flat_memory'] is False  # not measured: not met
  assert many_fits.checkpoints(200) == [1, 2, 20, 50, 100, 150, 200]
  assert many_fits.checkpoints(3) == [1, 2, 3]


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
