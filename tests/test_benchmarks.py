"""The benchmark script keeps working (a smoke run; no timing is asserted here)."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_and_reports_every_variant(tmp_path):
  spec = importlib.util.spec_from_file_location('bench', ROOT / 'benchmarks' / 'run.py')
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / 'results.json'
  assert bench.main(['--quick', '--out', str(out)]) == 0
  results = json.loads(out.read_text())
  assert set(results['models']) == set(bench.MODELS)
  for variants in results['models'].values():
    assert set(variants) == set(bench.VARIANTS)
    assert variants['plain_jax']['ratio'] == 1.0
    assert all(v['ms_per_step'] > 0 for v in variants.values())
  assert set(bench.TARGETS) <= {(m, v) for m in bench.MODELS for v in bench.VARIANTS}
