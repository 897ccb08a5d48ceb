import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxtrain as ft
from flaxtrain import history as history_module


def test_steps_are_transferred_in_one_batch_per_flush(monkeypatch):
  calls = []
  real = jax.device_get
  monkeypatch.setattr(history_module.jax, 'device_get', lambda x: calls.append(1) or real(x))
  history = ft.History(flush_every=10)
  for step in range(1, 10):
    history.record_step(step, {'loss': jnp.float32(step)})
  assert calls == [], 'recording must not pull values off the device'
  history.record_step(10, {'loss': jnp.float32(10)})
  assert len(calls) == 1, 'the tenth record flushes all ten in one transfer'
  np.testing.assert_array_equal(history.steps()['loss'], np.arange(1, 11))
  assert len(calls) == 1, 'nothing left to transfer'


def test_export_fills_missing_metrics_with_nan():
  history = ft.History()
  history.record_step(1, {'loss': 1.0})
  history.record_step(2, {'loss': 0.5, 'grad_norm': jnp.float32(3.0)})
  steps = history.steps()
  np.testing.assert_array_equal(steps['step'], [1, 2])
  assert np.isnan(steps['grad_norm'][0]) and steps['grad_norm'][1] == 3.0
  assert len(history) == 2


def test_epochs_record_the_step_they_ended_at():
  history = ft.History()
  history.record_epoch(0, {'val_loss': jnp.float32(0.7), 'train_loss': 0.9}, step=8)
  history.record_epoch(1, {'val_loss': 0.4, 'train_loss': 0.5}, step=16)
  epochs = history.epochs()
  np.testing.assert_array_equal(epochs['epoch'], [0, 1])
  np.testing.assert_array_equal(epochs['step'], [8, 16])
  np.testing.assert_allclose(epochs['val_loss'], [0.7, 0.4], rtol=1e-6)


def test_state_dict_round_trips_through_json():
  history = ft.History()
  history.record_step(1, {'loss': jnp.float32(2.5)})
  history.record_epoch(0, {'val_accuracy': 0.75}, step=1)
  restored = ft.History.from_state_dict(json.loads(json.dumps(history.state_dict())))
  for a, b in ((history.steps(), restored.steps()), (history.epochs(), restored.epochs())):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_bad_input():
  with pytest.raises(ValueError, match='flush_every: expected a positive int, got 0'):
    ft.History(flush_every=0)
  with pytest.raises(TypeError, match='metrics: expected a dict of scalars, got float'):
    ft.History().record_step(1, 0.5)
  with pytest.raises(ValueError, match="state: expected a dict with keys 'steps' and 'epochs'"):
    ft.History.from_state_dict({'steps': []})


@pytest.mark.parametrize('step, metrics, error, match', [
    (2, {'loss': jnp.ones(3)}, ValueError, r"metrics: expected a scalar number for 'loss', got ArrayImpl shape \(3,\)"),
    (2, {'loss': 'low'}, ValueError, r"metrics: expected a scalar number for 'loss', got str 'low'"),
    (2, {'loss': np.array([1.0, 2.0])}, ValueError, r"shape \(2,\)"),
    (2, {1: 0.5}, ValueError, 'metrics: expected metric names that are strings'),
    (2, [0.5], TypeError, 'metrics: expected a dict of scalars, got list'),
    (1, {'loss': 0.5}, ValueError, r'step: expected a step after the last recorded one \(1\), got 1'),
    (0, {'loss': 0.5}, ValueError, r'step: expected a step after the last recorded one \(1\), got 0'),
    (-1, {'loss': 0.5}, ValueError, r'step: expected an int >= 0, got -1'),
    (2.5, {'loss': 0.5}, ValueError, r'step: expected an int >= 0, got 2.5'),
])
def test_record_step_rejects_bad_input_when_recorded_not_at_export(step, metrics, error, match):
  history = ft.History(flush_every=100)
  history.record_step(1, {'loss': jnp.float32(1.0)})  # pending, not flushed: the check needs no sync
  with pytest.raises(error, match=match):
    history.record_step(step, metrics)
  assert len(history) == 1


def test_record_epoch_rejects_non_scalar_metrics():
  with pytest.raises(ValueError, match=r"metrics: expected a scalar number for 'val_loss'"):
    ft.History().record_epoch(0, {'val_loss': [0.5, 0.4]}, step=10)


def test_history_log_appends_only_new_rows_and_detects_a_changed_file(tmp_path):
  from flaxtrain.history import HistoryError, HistoryLog
  history = ft.History()
  log = HistoryLog(tmp_path)
  for step in range(3):
    history.record_step(step, {'loss': float(step)})
  first = log.write(history)
  size = first[-1]['bytes']
  history.record_step(3, {'loss': 3.0})
  history.record_epoch(0, {'val_loss': 0.5}, step=4)
  second = log.write(history)
  log.close()
  path = tmp_path / second[-1]['file']
  assert len(path.read_text().splitlines()) == 5  # every row once: nothing rewritten
  assert HistoryLog.read(tmp_path, first).state_dict()['steps'] == history.state_dict()['steps'][:3]
  assert HistoryLog.read(tmp_path, second).state_dict() == history.state_dict()
  raw = bytearray(path.read_bytes())
  raw[size // 2] ^= 0x01
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r'history: .*\.jsonl does not hold the \d+ bytes recorded .*checksum'):
    HistoryLog.read(tmp_path, first)
  with pytest.raises(HistoryError):  # what fit catches to fall back to an older checkpoint
    HistoryLog.read(tmp_path, first)
  path.write_bytes(bytes(raw[:size // 2]))  # cut short
  with pytest.raises(HistoryError, match=r'does not hold the \d+ bytes'):
    HistoryLog.read(tmp_path, second)
  (tmp_path / second[-1]['file']).unlink()
  with pytest.raises(HistoryError, match=r'history: cannot read'):
    HistoryLog.read(tmp_path, second)


# A write that fails (a full disk), in a real process whose file size is limited by the OS -------------

FULL_DISK = '''
import json, resource, signal, sys
import flaxtrain as ft
from flaxtrain.history import HistoryLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
directory = sys.argv[1]
history, log, failures = ft.History(), HistoryLog(directory), []
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, hard))  # the disk is full after about 3 kB per file
segments = None
for step in range(200):
  history.record_step(step, {'loss': step / 7, 'accuracy': 1 / (step + 1)})
  if step % 20 == 19:
    try:
      segments = log.write(history)
    except OSError as error:
      failures.append(error.errno)
      if len(failures) == 2:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space is freed
log.close()  # must not raise what the failed writes left behind
print(json.dumps({'failures': failures, 'segments': segments, 'state': history.state_dict()}))
'''


def test_a_failed_write_raises_once_and_the_next_write_loses_no_row(tmp_path):
  import subprocess
  import sys
  result = subprocess.run([sys.executable, '-c', FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(out['failures']) == 2 and all(code == 27 for code in out['failures'])  # EFBIG, as ENOSPC would be
  segments = out['segments']
  assert len(segments) >= 2  # the file given up at its last good byte, then a new one
  from flaxtrain.history import HistoryLog
  assert HistoryLog.read(tmp_path, segments).state_dict() == out['state']  # every row, each once


def test_closing_a_history_log_never_raises(tmp_path):
  from flaxtrain.history import HistoryLog
  log = HistoryLog(tmp_path)
  history = ft.History()
  history.record_step(0, {'loss': 1.0})
  log.write(history)
  log.close()
  log.close()  # twice is fine
  HistoryLog(tmp_path / 'never_written').close()
