"""Data-parallel training (flaxtrain.parallel) on 8 simulated CPU devices, against 1 device.

JAX fixes the number of CPU devices when its backend starts, so the 8-device
runs happen in one subprocess (tests/_parallel_worker.py, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) that runs every
check and returns JSON; the one-device references run here, in the pytest
process (one CPU device). The multi-host test starts two more processes that
meet through ``jax.distributed.initialize`` on localhost.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import flaxtrain as ft
import _parallel_worker as worker

DEVICES = 8
WORKER = pathlib.Path(worker.__file__)
# 8 devices add partial sums in another order than 1: float32 rounding, not a different computation.
ATOL, RTOL = 2e-5, 2e-5


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the worker sets its own
  env['PYTHONPATH'] = os.pathsep.join([str(WORKER.parents[1]), env.get('PYTHONPATH', '')])
  return env


def _result(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.startswith('RESULT ')]
  assert lines, f'the worker printed no result; its output ends:\n{stdout[-2000:]}'
  return json.loads(lines[-1][len('RESULT '):])


@pytest.fixture(scope='module')
def single():
  """The one-device references, computed here; and a checkpoint written on 1 device."""
  assert jax.device_count() == 1, 'the pytest process must have one device for these references'
  run, (model, optimizer, _) = worker.train_run()
  return {'run': run, 'state': worker.state_lists((model, optimizer)), 'fit': worker.fit_run(),
          'model': model, 'optimizer': optimizer}


@pytest.fixture(scope='module')
def eight(single, tmp_path_factory):
  """The 8-device worker's results: it restores the 1-device checkpoint and writes its own."""
  directory = tmp_path_factory.mktemp('parallel')
  ft.Checkpoints(directory / 'one').save(worker.STEPS, single['model'], single['optimizer'])
  process = subprocess.run(
      [sys.executable, str(WORKER), 'checks', str(DEVICES), str(directory / 'one'), str(directory / 'eight')],
      capture_output=True, text=True, env=_env(), timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  out = _result(process.stdout)
  out['eight_dir'] = directory / 'eight'
  return out


def _assert_close(got, want):
  if isinstance(want, dict):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=ATOL, rtol=RTOL, err_msg=key)
  else:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=RTOL)


def test_worker_has_8_devices(eight):
  assert eight['device_count'] == DEVICES
  assert eight['num_devices'] == DEVICES


@pytest.mark.parametrize('run', ['replicated', 'sharded', 'many_scan', 'many_loop', 'loss_scale',
                                 'user_mesh', 'half'])
def test_steps_on_many_devices_match_one_device(eight, single, run):
  want = single['run']
  got = eight[run]
  _assert_close(got['losses'], want['losses'])
  _assert_close(got['grad_norms'], want['grad_norms'])
  _assert_close(got['params'], want['params'])
  # The steps trained: the parameters moved away from their initial values.
  initial = worker.params(worker.model_and_optimizer()[0])
  assert any(not np.allclose(got['params'][k], initial[k], atol=1e-3) for k in initial)


def test_parallel_step_keeps_the_fast_path(eight):
  assert eight['replicated']['fast_path'] is True


def test_fit_on_8_devices_matches_one_device(eight, single):
  got, want = eight['fit']['epoch'], single['fit']['epoch']
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key
  _assert_close(eight['fit']['params'], single['fit']['params'])


def test_evaluate_on_padded_batches_matches_one_device(eight):
  model, _ = worker.model_and_optimizer()
  val = ft.DataLoader(ft.load_digits().val, 64, shuffle=False, remainder='pad')
  want = ft.evaluate(ft.make_eval_step(), model, val.epoch(0))
  for name in ('evaluate', 'evaluate_arg'):
    assert eight[name]['count'] == want['count'] == 360.0  # the padding is not counted
    assert eight[name]['accuracy'] == want['accuracy']
    assert eight[name]['loss'] == pytest.approx(want['loss'], rel=1e-5)


def test_replicated_state_is_on_every_device(eight):
  for shape, spec, replicated, shard, devices in eight['replicated']['state_specs']:
    assert (spec, replicated, shard, devices) == ('P()', True, shape, DEVICES)


def test_batches_are_split_along_the_data_axis(eight):
  for key, (shape, spec, replicated, shard, devices) in eight['batch_specs'].items():
    assert spec == "P('data',)" and not replicated and devices == DEVICES, key
    assert shard == [shape[0] // DEVICES, *shape[1:]], key


def _expected_spec(shape, min_size):
  """The FSDP rule as documented: the largest axis divisible by the device count, if large enough."""
  if int(np.prod(shape)) < max(min_size, 1):
    return None
  fits = [d for d, size in enumerate(shape) if size % DEVICES == 0]
  return max(fits, key=lambda d: shape[d]) if fits else None


@pytest.mark.parametrize('key,min_size', [('param_specs', 0), ('opt_specs', 0)])
def test_sharded_params_and_optimizer_state(eight, key, min_size):
  specs = eight['sharded'][key]
  assert any(not replicated for _, _, replicated, _, _ in specs)
  for shape, spec, replicated, shard, devices in specs:
    axis = _expected_spec(shape, min_size)
    assert devices == DEVICES
    if axis is None:
      assert (spec, replicated, shard) == ('P()', True, shape)
    else:
      assert not replicated
      assert shard == [size // DEVICES if d == axis else size for d, size in enumerate(shape)]
      assert spec == 'P(' + ', '.join("'data'" if d == axis else 'None' for d in range(len(shape))) + (
          ',)' if len(shape) == 1 else ')')


def test_sharded_default_keeps_small_arrays_replicated(eight):
  for shape, spec, replicated, shard, devices in eight['default_sharded_specs']:
    axis = _expected_spec(shape, 1024)
    assert replicated == (axis is None), (shape, spec)
  assert any(not r for _, _, r, _, _ in eight['default_sharded_specs'])
  assert any(r for _, _, r, _, _ in eight['default_sharded_specs'])


def test_user_mesh_splits_the_batch_along_its_axis(eight):
  assert eight['user_mesh']['num_devices'] == DEVICES // 2


@pytest.mark.parametrize('where', ['shard_batch', 'step', 'many', 'eval_step'])
def test_indivisible_batch_names_both_numbers(eight, where):
  kind, message = eight['errors'][where]
  assert kind == 'ValueError'
  assert 'batch size 100' in message and f'{DEVICES} devices' in message


@pytest.mark.parametrize('where', ['fit', 'fit_val'])
def test_fit_checks_loader_batch_sizes_first(eight, where):
  kind, message = eight['errors'][where]
  assert kind == 'ValueError'
  assert message.startswith('train_loader' if where == 'fit' else 'val_loader')
  assert 'batch_size 100' in message and f'{DEVICES} devices' in message
  assert eight['untouched_after_errors'] is True  # no error trained the model


@pytest.mark.parametrize('where,kind,argument', [
    ('devices_empty', 'ValueError', 'devices'),
    ('devices_type', 'TypeError', 'devices'),
    ('params_mode', 'ValueError', 'params'),
    ('axis', 'ValueError', 'axis'),
    ('mesh_and_devices', 'ValueError', 'devices'),
    ('parallel_type', 'TypeError', 'parallel'),
])
def test_bad_arguments_name_the_argument(eight, where, kind, argument):
  got_kind, message = eight['errors'][where]
  assert got_kind == kind
  assert message.startswith(f'{argument}:')


def test_checkpoint_from_1_device_restores_on_8(eight, single):
  restored = eight['restored']
  _assert_close(restored['params'], single['run']['params'])
  assert restored['step'] == worker.STEPS
  specs = restored['param_specs'] + restored['opt_specs']  # onto the placement the model had
  assert specs == eight['sharded']['param_specs'] + eight['sharded']['opt_specs']


def test_checkpoint_from_8_devices_restores_on_1(eight):
  model, optimizer = worker.model_and_optimizer(seed=1)
  info = ft.restore_checkpoint(eight['eight_dir'], model, optimizer)
  assert info.step == worker.STEPS
  got = worker.state_lists((model, optimizer))
  assert len(got) == len(eight['saved'])
  for a, b in zip(got, eight['saved']):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
  for x in jax.tree.leaves(nnx.state((model, optimizer))):  # onto the model's one device
    assert x.sharding.device_set == {jax.devices()[0]}


def test_single_device_parallel_argument_validation():
  with pytest.raises(TypeError, match='^parallel:'):
    ft.make_eval_step(parallel=1)
  with pytest.raises(TypeError, match='^parallel:'):
    ft.fit(*worker.model_and_optimizer(), ft.DataLoader(ft.load_digits().train, 64), epochs=1,
           progress=False, parallel='all')
  with pytest.raises(ValueError, match='^min_shard_size:'):
    ft.DataParallel(min_shard_size=-1)


def test_one_device_data_parallel_matches_no_parallel(single):
  run = worker.train_run(ft.DataParallel())[0]
  _assert_close(run['params'], single['run']['params'])
  assert run['losses'] == pytest.approx(single['run']['losses'], rel=1e-6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost(single, tmp_path):
  """jax.distributed.initialize with 2 CPU processes of 2 devices each (gloo collectives)."""
  port = _free_port()
  # Output goes to files: a full pipe would block one process inside a collective the other waits on.
  logs = [(open(tmp_path / f'out{i}', 'w+'), open(tmp_path / f'err{i}', 'w+')) for i in range(2)]
  processes = [subprocess.Popen([sys.executable, str(WORKER), 'host', str(i), str(port)], env=_env(),
                                stdout=out, stderr=err, text=True) for i, (out, err) in enumerate(logs)]
  outputs = []
  try:
    for process, (out, err) in zip(processes, logs):
      process.wait(timeout=300)
      out.seek(0)
      err.seek(0)
      assert process.returncode == 0, err.read()[-3000:]
      outputs.append(_result(out.read()))
  finally:
    for process, files in zip(processes, logs):
      if process.poll() is None:
        process.kill()
        process.wait()
      for file in files:
        file.close()
  assert [o['process_index'] for o in outputs] == [0, 1]
  for out in outputs:
    assert out['device_count'] == out['num_devices'] == 2 * worker.HOST_DEVICES
    assert out['local_device_count'] == worker.HOST_DEVICES
    _assert_close(out['losses'], single['run']['losses'])
    _assert_close(out['grad_norms'], single['run']['grad_norms'])
    _assert_close(out['params'], single['run']['params'])
    for key, value in single['fit']['epoch'].items():
      assert out['fit'][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
