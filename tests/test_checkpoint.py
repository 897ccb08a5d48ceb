"""Checkpoints: exact round trips, latest and best, clear errors, atomic writes, no pickle."""

import os
import pathlib
import re
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxtrain as ft
from _trees import as_numpy, assert_trees_equal


def make_batch(seed, n=16):
  rng = np.random.default_rng(seed)
  return {
      'image': rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
      'label': rng.integers(0, 10, size=n).astype(np.int32),
  }


def make_mlp(seed=0, hidden=(16,), dropout_rate=0.3, **kwargs):
  return ft.MLP(64, hidden, 10, dropout_rate=dropout_rate, rngs=nnx.Rngs(seed), **kwargs)


def make_cnn(seed=0):
  return ft.CNN(features=(4, 8), hidden=16, dropout_rate=0.3, batch_norm=True, rngs=nnx.Rngs(seed))


def make_optimizer(model):
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.inject_hyperparams(optax.adamw)(learning_rate=optax.linear_schedule(1e-3, 0.0, 20)),
  )
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def train(model, optimizer, steps, first_seed=0):
  step = ft.make_train_step()
  for seed in range(first_seed, first_seed + steps):
    step(model, optimizer, make_batch(seed))


@pytest.mark.parametrize('make_model', [make_mlp, make_cnn], ids=['mlp_dropout', 'cnn_batchnorm_dropout'])
def test_restore_gives_back_every_array_bit_for_bit(tmp_path, make_model):
  model = make_model(seed=0)
  optimizer = make_optimizer(model)
  train(model, optimizer, steps=3)  # moments, step count, BatchNorm statistics and RNG count move
  with ft.Checkpoints(tmp_path) as checkpoints:
    checkpoints.save(3, model, optimizer, metadata={'epoch': 1, 'note': 'x', 'curve': [0.5, float('nan')]})

  fresh = make_model(seed=1)
  fresh_optimizer = make_optimizer(fresh)
  assert not np.array_equal(as_numpy(fresh)['out']['kernel'], as_numpy(model)['out']['kernel'])
  info = ft.restore_checkpoint(tmp_path, fresh, fresh_optimizer)

  assert_trees_equal(as_numpy(fresh), as_numpy(model))
  assert_trees_equal(as_numpy(fresh_optimizer), as_numpy(optimizer))
  assert info.step == 3 and info.path == tmp_path.resolve() / 'latest' / '3'
  assert info.metadata['epoch'] == 1 and info.metadata['note'] == 'x'
  assert info.metadata['curve'][0] == 0.5 and np.isnan(info.metadata['curve'][1])
  # The restored pair trains on exactly as the original does, Dropout masks included.
  train(model, optimizer, steps=2, first_seed=10)
  train(fresh, fresh_optimizer, steps=2, first_seed=10)
  assert_trees_equal(as_numpy(fresh), as_numpy(model))


def test_restoring_the_model_alone_leaves_the_optimizer_out(tmp_path):
  model = make_mlp(seed=0)
  optimizer = make_optimizer(model)
  train(model, optimizer, steps=2)
  ft.Checkpoints(tmp_path).save(2, model, optimizer)
  fresh = make_mlp(seed=5)
  ft.restore_checkpoint(tmp_path, fresh)
  assert_trees_equal(as_numpy(fresh), as_numpy(model))


@pytest.mark.parametrize('keep', [1, 2])
def test_the_last_keep_latest_and_the_best_are_kept_and_nothing_else(tmp_path, keep):
  model = make_mlp()
  optimizer = make_optimizer(model)
  kernels = {}
  with ft.Checkpoints(tmp_path, keep=keep) as checkpoints:
    for step, best in [(1, True), (2, False), (3, True), (4, False)]:
      train(model, optimizer, steps=1, first_seed=step)
      kernels[step] = as_numpy(model)['out']['kernel']
      checkpoints.save(step, model, optimizer, best=best)
    assert checkpoints.step('latest') == 4 and checkpoints.step('best') == 3
  assert sorted(os.listdir(tmp_path / 'latest')) == ['4', '3'][:keep][::-1]
  assert sorted(os.listdir(tmp_path / 'best')) == ['3']
  for which, step in [('latest', 4), ('best', 3)]:
    fresh = make_mlp(seed=9)
    assert ft.restore_checkpoint(tmp_path, fresh, which=which).step == step
    np.testing.assert_array_equal(as_numpy(fresh)['out']['kernel'], kernels[step])


@pytest.mark.parametrize('other, mismatch', [
    (lambda: make_mlp(hidden=(32,)), r"model: 'hidden/0/(bias|kernel)' has shape \((64, )?32,?\)"),
    (lambda: make_mlp(param_dtype=jnp.bfloat16), r"model: 'hidden/0/bias' has shape \(16,\) and dtype bfloat16"),
    (lambda: make_mlp(hidden=(16, 16)), r"model: the checkpoint at .* has no 'hidden/1/bias'"),
    (lambda: make_mlp(dropout_rate=0.0), r"model: the checkpoint at .* holds 'dropout/rngs/count'"),
], ids=['wider', 'bfloat16', 'deeper', 'no_dropout'])
def test_restoring_into_a_different_model_names_the_mismatched_variable(tmp_path, other, mismatch):
  model = make_mlp()
  ft.Checkpoints(tmp_path).save(0, model, make_optimizer(model))
  different = other()
  before = as_numpy(different)
  with pytest.raises(ValueError, match=mismatch):
    ft.restore_checkpoint(tmp_path, different)
  assert_trees_equal(as_numpy(different), before)  # nothing was half-restored


def test_restoring_into_a_different_optimizer_names_the_optimizer_state(tmp_path):
  model = make_mlp()
  ft.Checkpoints(tmp_path).save(0, model, make_optimizer(model))
  sgd = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
  with pytest.raises(ValueError, match=r"optimizer: the checkpoint at .* has no 'opt_state/0/trace/"):
    ft.restore_checkpoint(tmp_path, model, sgd)


def test_missing_or_empty_directories_are_named(tmp_path):
  model = make_mlp()
  with pytest.raises(FileNotFoundError, match=f'{tmp_path / "nope"} does not exist'):
    ft.restore_checkpoint(tmp_path / 'nope', model)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=r"no complete 'latest' checkpoint in .*empty"):
    ft.restore_checkpoint(tmp_path / 'empty', model)
  ft.Checkpoints(tmp_path / 'run').save(1, model, make_optimizer(model))  # latest, no best
  with pytest.raises(FileNotFoundError, match="no complete 'best' checkpoint"):
    ft.restore_checkpoint(tmp_path / 'run', model, which='best')
  (tmp_path / 'file').write_text('not a directory')
  with pytest.raises(NotADirectoryError, match='directory: expected a directory'):
    ft.Checkpoints(tmp_path / 'file')


def _remove_model_item(step_dir):
  shutil.rmtree(step_dir / 'model')


def _scramble_array_data(step_dir):
  for path in (step_dir / 'model').rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.write_bytes(b'\x00garbage' * 8)


def _truncate_every_model_file(step_dir):
  for path in (step_dir / 'model').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')


def _break_metadata_json(step_dir):
  for path in (step_dir / 'metadata').iterdir():
    if path.is_file() and path.name != 'commit_success.txt':
      path.write_text('{"epoch": ')


@pytest.mark.parametrize('corrupt', [
    _remove_model_item, _scramble_array_data, _truncate_every_model_file, _break_metadata_json,
], ids=['missing_item', 'scrambled_data', 'truncated_files', 'broken_json'])
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # orbax's reader threads
def test_a_corrupt_checkpoint_is_reported_with_its_path(tmp_path, corrupt):
  model = make_mlp()
  ft.Checkpoints(tmp_path).save(7, model, make_optimizer(model))
  corrupt(tmp_path / 'latest' / '7')
  fresh = make_mlp(seed=3)
  with pytest.raises(ValueError, match=re.escape(f'cannot read the checkpoint at {tmp_path / "latest" / "7"}')):
    ft.restore_checkpoint(tmp_path, fresh, make_optimizer(fresh))


def test_what_a_crash_before_the_commit_leaves_is_ignored_then_removed(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  train(model, optimizer, steps=1)
  good = as_numpy(model)
  with ft.Checkpoints(tmp_path) as checkpoints:
    checkpoints.save(1, model, optimizer)
    checkpoints.save(2, model, optimizer)
  # A save killed before orbax's final rename leaves its files under a temporary name.
  (tmp_path / 'latest' / '2').rename(tmp_path / 'latest' / '2.orbax-checkpoint-tmp-1712345678901234')
  reopened = ft.Checkpoints(tmp_path, keep=1)
  assert reopened.step('latest') == 1 and reopened.blocking_contents() == ['latest/1']
  fresh = make_mlp(seed=4)
  reopened.restore(fresh)
  assert_trees_equal(as_numpy(fresh), good)
  reopened.adopt()  # as fit does when it resumes: step 1 is this run's to rotate
  reopened.save(2, model, optimizer)  # the next save succeeds, and removes step 1 (keep=1) only now
  reopened.close()
  assert sorted(os.listdir(tmp_path / 'latest')) == ['2']  # the temporary directory went with the writer


def test_checkpoint_files_hold_no_pickle(tmp_path):
  model = make_cnn()
  optimizer = make_optimizer(model)
  ft.Checkpoints(tmp_path).save(1, model, optimizer, metadata={'history': {'steps': [], 'epochs': []}}, best=True)
  files = [p for p in tmp_path.rglob('*') if p.is_file()]
  assert files
  for path in files:
    head = path.read_bytes()[:2]
    assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), f'{path} starts like a pickle'
  sources = pathlib.Path(ft.__file__).parent.glob('*.py')
  for source in sources:
    assert not re.search(r'^\s*(import|from)\s+(pickle|cloudpickle|dill)\b', source.read_text(), re.M), source


@pytest.mark.parametrize('call, error, message', [
    (lambda c, m, o: c.save(-1, m, o), ValueError, 'step: expected an int >= 0'),
    (lambda c, m, o: c.save(1.0, m, o), ValueError, 'step: expected an int >= 0'),
    (lambda c, m, o: c.save(1, m, 'adam'), TypeError, 'optimizer: expected an nnx.Optimizer'),
    (lambda c, m, o: c.step('first'), ValueError, "which: expected 'latest' or 'best'"),
    (lambda c, m, o: c.restore('model'), TypeError, 'model: expected an nnx.Module'),
    (lambda c, m, o: ft.Checkpoints(3), TypeError, 'directory: expected a path'),
    (lambda c, m, o: ft.Checkpoints(c.directory, keep=0), ValueError, 'keep: expected a positive int, got 0'),
    (lambda c, m, o: c.save(1, m, o, metadata={'f': print}), TypeError, 'metadata: expected a JSON-serialisable dict'),
], ids=['negative_step', 'float_step', 'not_an_optimizer', 'bad_which', 'not_a_model', 'bad_directory', 'keep_0',
        'metadata_not_json'])
def test_bad_arguments_are_named(tmp_path, call, error, message):
  model = make_mlp()
  with pytest.raises(error, match=message):
    call(ft.Checkpoints(tmp_path), model, make_optimizer(model))
  assert not (tmp_path / 'latest').exists()


# Integrity: checksums, fallback, nothing deleted that this writer did not write --------------------


def _largest_model_file(step_dir):
  files = [p for p in (step_dir / 'model').rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def test_every_bit_flip_in_the_array_data_is_detected_or_harmless(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  train(model, optimizer, steps=1)
  ft.Checkpoints(tmp_path).save(1, model, optimizer)
  saved = as_numpy(model)
  data = _largest_model_file(tmp_path / 'latest' / '1')
  raw = data.read_bytes()
  named = 0
  for bit in np.linspace(0, 8 * len(raw) - 1, 12).astype(int):
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    data.write_bytes(bytes(flipped))
    fresh = make_mlp(seed=4)
    try:
      ft.restore_checkpoint(tmp_path, fresh)
    except ValueError as error:
      named += bool(re.search(r"array model/\S+ does not match the SHA-256 checksum", str(error)))
      assert f'step 1: ' in str(error) and error.__cause__ is not None
    else:  # the flip hit bytes no array is read from: every value must be exactly as saved
      assert_trees_equal(as_numpy(fresh), saved)
  data.write_bytes(raw)
  assert named >= 6  # most flips land in array bytes and are named by the checksum


def test_restore_skips_a_corrupt_newest_checkpoint_and_says_why(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  with ft.Checkpoints(tmp_path, keep=3) as checkpoints:
    for step in (1, 2, 3):
      train(model, optimizer, steps=1, first_seed=step)
      if step == 2:
        at_2 = as_numpy(model)
      checkpoints.save(step, model, optimizer)
  data = _largest_model_file(tmp_path / 'latest' / '3')
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  data.write_bytes(bytes(raw))
  shutil.rmtree(tmp_path / 'latest' / '2' / 'optimizer')  # step 2 lacks its optimizer: model alone is fine

  fresh = make_mlp(seed=4)
  with pytest.warns(RuntimeWarning, match=r'skipped the latest checkpoint of step 3: .*latest/3 is corrupt.*'
                    r'Restored step 2 instead') as caught:
    info = ft.restore_checkpoint(tmp_path, fresh)
  assert len(caught) == 1
  assert info.step == 2 and [step for step, _ in info.skipped] == [3]
  assert re.search(r'latest/3 is corrupt: array model/\S+ does not match', info.skipped[0][1])
  assert_trees_equal(as_numpy(fresh), at_2)
  assert sorted(os.listdir(tmp_path / 'latest')) == ['1', '2', '3']  # a reader changes nothing

  fresh_optimizer = make_optimizer(fresh)
  with pytest.warns(RuntimeWarning, match='of step 2: cannot read the checkpoint at .*Restored step 1 instead'):
    info = ft.restore_checkpoint(tmp_path, fresh, fresh_optimizer)  # step 2 cannot give an optimizer now
  assert info.step == 1 and [step for step, _ in info.skipped] == [3, 2]
  assert 'cannot read the checkpoint at' in info.skipped[1][1]


def test_when_no_checkpoint_verifies_every_reason_is_given(tmp_path):
  model = make_mlp()
  with ft.Checkpoints(tmp_path, keep=2) as checkpoints:
    checkpoints.save(1, model, make_optimizer(model))
    checkpoints.save(2, model, make_optimizer(model))
  for step in ('1', '2'):
    _break_metadata_json(tmp_path / 'latest' / step)
  with pytest.raises(ValueError, match=r"no 'latest' checkpoint in .* can be used \(step 2: .*; step 1: ") as caught:
    ft.restore_checkpoint(tmp_path, make_mlp())
  assert caught.value.__cause__ is not None


def test_hand_edited_metadata_fails_its_checksum(tmp_path):
  model = make_mlp()
  ft.Checkpoints(tmp_path).save(4, model, make_optimizer(model), metadata={'epoch': 1, 'batch': 0})
  path = tmp_path / 'latest' / '4' / 'metadata' / 'metadata'
  path.write_text(path.read_text().replace('"epoch": 1', '"epoch": 2'))
  with pytest.raises(ValueError, match='its metadata does not match the checksum'):
    ft.restore_checkpoint(tmp_path, make_mlp())


def test_a_writer_deletes_only_checkpoints_it_wrote_or_adopted(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  with ft.Checkpoints(tmp_path, keep=1) as first:
    first.save(1, model, optimizer, best=True)
    first.save(2, model, optimizer)
  with ft.Checkpoints(tmp_path, keep=1) as second:
    second.save(3, model, optimizer, best=True)
    assert second.steps('latest') == [2, 3] and second.steps('best') == [1, 3]  # not its own: kept
    with pytest.raises(ft.CheckpointError, match=r'latest/3 already exists; a checkpoint is never overwritten'):
      second.save(3, model, optimizer)
  with ft.Checkpoints(tmp_path, keep=1) as third:
    third.adopt()
    third.save(4, model, optimizer, best=True)
    assert third.steps('latest') == [4] and third.steps('best') == [4]


def test_checkpoint_info_repr_is_short(tmp_path):
  model = make_mlp()
  ft.Checkpoints(tmp_path).save(1, model, make_optimizer(model), metadata={'curve': list(range(20_000))})
  info = ft.restore_checkpoint(tmp_path, make_mlp())
  assert len(info.metadata['curve']) == 20_000
  assert len(repr(info)) < 200 and 'step=1' in repr(info) and 'curve' in repr(info)


def test_an_unwritable_directory_is_reported_before_anything_is_written(tmp_path, monkeypatch):
  model = make_mlp()

  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied')

  monkeypatch.setattr(ft.checkpoint.tempfile, 'mkstemp', refuse)  # as a read-only directory would
  checkpoints = ft.Checkpoints(tmp_path / 'run')
  with pytest.raises(ft.CheckpointError, match=r'cannot write to .*run \(PermissionError') as caught:
    checkpoints.save(1, model, make_optimizer(model))
  assert isinstance(caught.value.__cause__, PermissionError)
  assert not checkpoints.writing and not list((tmp_path / 'run').glob('*/*'))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only directories')
def test_a_read_only_directory_is_reported(tmp_path):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run').chmod(0o555)
  model = make_mlp()
  with pytest.raises(ft.CheckpointError, match='cannot write to'):
    ft.Checkpoints(tmp_path / 'run').save(1, model, make_optimizer(model))


# One writer per directory, with real processes -------------------------------------------------------

HOLDER = '''
import sys, time
import flaxtrain as ft
checkpoints = ft.Checkpoints(sys.argv[1])
checkpoints.acquire()
print('locked', flush=True)
time.sleep(120)
'''


def start_lock_holder(directory):
  """A separate Python process that takes the writer lock of ``directory`` and sleeps."""
  import subprocess
  import sys
  holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
  line = holder.stdout.readline()  # blocks until the lock is held (or the process died)
  assert line.strip() == 'locked', line
  return holder


def test_a_second_writer_fails_at_once_and_the_lock_dies_with_its_holder(tmp_path):
  import signal
  import time
  model = make_mlp()
  optimizer = make_optimizer(model)
  holder = start_lock_holder(tmp_path)
  try:
    start = time.perf_counter()
    with pytest.raises(ft.CheckpointError, match=f'is in use by another writer \\(process {holder.pid} ') as caught:
      ft.Checkpoints(tmp_path).save(1, model, optimizer)
    assert time.perf_counter() - start < 5  # no waiting for the lock
    assert isinstance(caught.value.__cause__, OSError)
    assert ft.Checkpoints(tmp_path).step('latest') is None  # nothing was written
  finally:
    holder.send_signal(signal.SIGKILL)  # kill -9: no clean-up code runs in the holder
    holder.wait(timeout=30)
  with ft.Checkpoints(tmp_path) as checkpoints:  # the OS released the lock with the process
    checkpoints.save(1, model, optimizer)
  assert ft.Checkpoints(tmp_path).step('latest') == 1


def test_two_writers_in_one_process_are_refused_too(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  with ft.Checkpoints(tmp_path) as first:
    first.save(1, model, optimizer)
    with pytest.raises(ft.CheckpointError, match='in use by another writer'):
      ft.Checkpoints(tmp_path).save(2, model, optimizer)
    assert ft.restore_checkpoint(tmp_path, make_mlp()).step == 1  # reading needs no lock
  with ft.Checkpoints(tmp_path) as second:  # close() released it
    second.save(2, model, optimizer)


# A run that never completed its first checkpoint, with a real process killed inside the first save -------------

FIRST_SAVE = '''
import sys
import optax
from flax import nnx
import flaxtrain as ft
from flaxtrain.history import HistoryLog
directory = sys.argv[1]
model = ft.MLP(4096, (4096, 512), 10, rngs=nnx.Rngs(0))  # about 90 MB with Adam's moments: a slow save
optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
history = ft.History()
history.record_step(0, {'loss': 1.0})
checkpoints = ft.Checkpoints(directory)
checkpoints.acquire()
HistoryLog(checkpoints.directory / 'history').write(history)  # as fit does, just before the save
print('saving', flush=True)
checkpoints.save(1, model, optimizer)
print('saved', flush=True)
'''


def kill_inside_the_first_save(directory):
  """Runs FIRST_SAVE and kills it (-9) as soon as orbax's temporary directory appears."""
  import signal
  import subprocess
  import sys
  import time
  child = subprocess.Popen([sys.executable, '-c', FIRST_SAVE, str(directory)], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == 'saving'
    deadline = time.monotonic() + 120
    while not list((directory / 'latest').glob('1.orbax-checkpoint-tmp*')) and time.monotonic() < deadline:
      time.sleep(0.002)
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
  return ft.Checkpoints(directory).step('latest') is None  # False if the save won the race after all


def test_the_leftovers_of_a_first_save_killed_halfway_do_not_block_a_new_run(tmp_path):
  if not kill_inside_the_first_save(tmp_path):
    pytest.skip('the save completed before the kill landed')  # seen never on this machine: the save takes ~1 s
  checkpoints = ft.Checkpoints(tmp_path)
  assert [p.parent.name for p in tmp_path.glob('history/*.jsonl')] == ['history']  # its history file is there
  assert checkpoints.blocking_contents() == []
  (tmp_path / 'notes.txt').write_text('mine')
  assert checkpoints.blocking_contents() == ['notes.txt']  # a user's file still blocks
  (tmp_path / 'notes.txt').unlink()
  removed = checkpoints.discard_leftovers()
  assert any(name.startswith('history/') for name in removed)
  assert any('.orbax-checkpoint-tmp' in name for name in removed) or not list(tmp_path.glob('latest/*tmp*'))
  assert not list(tmp_path.glob('history/*')) and not list(tmp_path.glob('latest/*'))
  model = make_mlp()
  checkpoints.save(1, model, make_optimizer(model))  # a new run starts there
  checkpoints.close()


def test_what_blocks_a_new_run(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  checkpoints = ft.Checkpoints(tmp_path)
  assert checkpoints.blocking_contents() == []  # not even there yet
  (tmp_path / 'history').mkdir(parents=True)
  leftover = tmp_path / 'history' / ('ab' * 16 + '.jsonl')
  leftover.write_text('["s", {"step": 0.0}]\n')
  (tmp_path / 'history' / 'mine.jsonl').write_text('{}\n')  # not a name HistoryLog writes
  assert checkpoints.blocking_contents() == ['history/mine.jsonl']
  (tmp_path / 'history' / 'mine.jsonl').unlink()
  with ft.Checkpoints(tmp_path) as writer:
    writer.save(3, model, optimizer, best=True)
    writer.set_aside('latest', 3, 'for the test')
  # A best checkpoint and a set-aside one are of value; so is the history they refer to.
  assert checkpoints.blocking_contents() == [
      'best/3', f'history/{leftover.name}', 'set_aside/latest-3', 'set_aside/latest-3.reason.txt']
  assert checkpoints.discard_leftovers() == [] and leftover.exists()
  checkpoints.close()


# A resumed run reaches the steps of the timeline it abandoned ---------------------------------------------


def test_a_best_checkpoint_in_the_way_of_a_resumed_run_is_set_aside_not_overwritten(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  with ft.Checkpoints(tmp_path, keep=3) as first:
    for step in (1, 2, 3):
      train(model, optimizer, steps=1, first_seed=step)
      first.save(step, model, optimizer, best=True)
  old_best = as_numpy(model)
  data = _largest_model_file(tmp_path / 'latest' / '3')
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  data.write_bytes(bytes(raw))

  resumed = ft.Checkpoints(tmp_path, keep=3)  # what fit does on resume
  with pytest.warns(RuntimeWarning, match='skipped the latest checkpoint of step 3'):
    info = resumed.restore(model, optimizer)
  assert info.step == 2
  resumed.set_aside('latest', 3, info.skipped[0][1])
  resumed.adopt()
  train(model, optimizer, steps=1, first_seed=30)  # a different step 3
  with pytest.warns(RuntimeWarning, match=r'set aside the best checkpoint of step 3: .* moved to .*set_aside/best-3'):
    resumed.save(3, model, optimizer, best=True)  # was: "best/3 already exists"
  new_best = as_numpy(model)
  resumed.save(4, model, optimizer)
  resumed.close()
  assert sorted(os.listdir(tmp_path / 'set_aside')) == [
      'best-3', 'best-3.reason.txt', 'latest-3', 'latest-3.reason.txt']
  fresh = make_mlp(seed=7)
  assert ft.restore_checkpoint(tmp_path, fresh, which='best').step == 3
  assert_trees_equal(as_numpy(fresh), new_best)
  # Nothing lost: the old timeline's best is whole, and restores from its new place.
  (tmp_path / 'old').mkdir()
  shutil.copytree(tmp_path / 'set_aside' / 'best-3', tmp_path / 'old' / 'best' / '3')
  ft.restore_checkpoint(tmp_path / 'old', fresh, which='best')
  assert_trees_equal(as_numpy(fresh), old_best)


def test_set_aside_after_moves_the_abandoned_timeline_with_a_warning_each(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  with ft.Checkpoints(tmp_path, keep=5) as checkpoints:
    for step in (1, 2, 3, 4):
      checkpoints.save(step, model, optimizer, best=step in (1, 3))
    with pytest.warns(RuntimeWarning, match='set aside the (latest|best) checkpoint of step') as caught:
      moved = checkpoints.set_aside_after(2, 'the run resumed from step 2')
    assert len(caught) == 3
    assert [p.name for p in moved] == ['latest-3', 'latest-4', 'best-3']
    assert checkpoints.steps('latest') == [1, 2] and checkpoints.steps('best') == []  # best 1 went at best 3
  assert (tmp_path / 'set_aside' / 'best-3.reason.txt').read_text() == 'the run resumed from step 2\n'


def test_restore_skips_a_checkpoint_its_verify_callback_refuses(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  with ft.Checkpoints(tmp_path, keep=3) as checkpoints:
    for step in (1, 2, 3):
      checkpoints.save(step, model, optimizer, metadata={'history_ok': step < 3})

  def history_intact(info):
    if not info.metadata['history_ok']:
      raise ValueError(f'history of step {info.step} is cut short')

  with pytest.warns(RuntimeWarning, match='step 3: history of step 3 is cut short. Restored step 2'):
    info = ft.Checkpoints(tmp_path).restore(make_mlp(), verify=history_intact)
  assert info.step == 2 and info.skipped == ((3, 'history of step 3 is cut short'),)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert ft.Checkpoints(tmp_path).restore(make_mlp(), verify=history_intact, warn=False).step == 2

  def wrong(info):
    raise KeyError('not a refusal')  # any other error is the caller's bug: it propagates

  with pytest.raises(KeyError):
    ft.Checkpoints(tmp_path).restore(make_mlp(), verify=wrong)


def test_the_lock_is_released_even_when_closing_orbax_fails(tmp_path, monkeypatch):
  model = make_mlp()
  checkpoints = ft.Checkpoints(tmp_path)
  checkpoints.save(1, model, make_optimizer(model))

  def fail(self):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(ft.checkpoint.ocp.CheckpointManager, 'close', fail)
  with pytest.raises(OSError):
    checkpoints.close()
  monkeypatch.undo()
  assert not checkpoints.writing
  with ft.Checkpoints(tmp_path) as again:  # the same process, as a notebook would: not "in use"
    again.save(2, model, make_optimizer(model))


def test_an_empty_directory_name_is_refused():
  with pytest.raises(ValueError, match="directory: expected a path, got ''"):
    ft.Checkpoints('')


def test_restoring_prints_no_orbax_notice(tmp_path):
  import subprocess
  import sys
  script = ('import sys, optax, flaxtrain as ft\nfrom flax import nnx\n'
            'm = ft.MLP(4, (8,), 2, rngs=nnx.Rngs(0))\no = nnx.Optimizer(m, optax.adam(1e-3), wrt=nnx.Param)\n'
            'ft.Checkpoints(sys.argv[1]).save(1, m, o, best=True)\n'
            'print("restoring", file=sys.stderr)\n'
            'ft.restore_checkpoint(sys.argv[1], m, o)\nft.restore_checkpoint(sys.argv[1], m, which="best")\n')
  result = subprocess.run([sys.executable, '-c', script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=True)
  assert result.stderr.split('restoring', 1)[1].strip() == ''


# A reader restoring while a writer saves every step and rotates, with real processes -------------------------

ROTATING_WRITER = '''
import sys
import jax
import jax.numpy as jnp
import optax
from flax import nnx
import flaxtrain as ft
model = ft.MLP(64, (256,), 10, rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
with ft.Checkpoints(sys.argv[1], keep=1) as checkpoints:
  for step in range(100_000):
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: jnp.full_like(x, step), params))  # every array says its step
    checkpoints.save(step, model, optimizer)
    if step == 0:
      print('saved', flush=True)
'''


def test_a_reader_never_fails_while_a_writer_rotates(tmp_path):
  import subprocess
  import sys
  import time
  writer = subprocess.Popen([sys.executable, '-c', ROTATING_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert writer.stdout.readline().strip() == 'saved'
    steps, deadline = [], time.monotonic() + 40
    while time.monotonic() < deadline and len(steps) < 60:
      model = ft.MLP(64, (256,), 10, rngs=nnx.Rngs(1))
      with warnings.catch_warnings():
        warnings.simplefilter('error')  # a checkpoint rotated away is not a corrupt one
        info = ft.restore_checkpoint(tmp_path, model)
      kernel = as_numpy(model)['out']['kernel']
      assert np.all(kernel == info.step), 'the arrays of one step only'
      steps.append(info.step)
  finally:
    writer.kill()
    writer.wait(timeout=30)
  assert len(steps) >= 10 and steps == sorted(steps) and steps[-1] > steps[0]


# Ctrl-C during orbax's work: the process exits, and what is on disk restores --------------------------------

INTERRUPTED_WRITER = '''
import sys
import optax
from flax import nnx
import flaxtrain as ft
model = ft.MLP(64, (512, 512), 10, rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
checkpoints = ft.Checkpoints(sys.argv[1], keep=2)
print('started', flush=True)
for step in range(100_000):
  checkpoints.save(step, model, optimizer)
  ft.restore_checkpoint(sys.argv[1], model, optimizer)
'''


@pytest.mark.parametrize('delay', [0.0, 0.13, 0.41, 0.77, 1.3])
def test_ctrl_c_during_saves_and_restores_exits_and_leaves_a_checkpoint(tmp_path, delay):
  import signal
  import subprocess
  import sys
  import time
  child = subprocess.Popen([sys.executable, '-c', INTERRUPTED_WRITER, str(tmp_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == 'started'
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)  # hung at exit: TimeoutExpired
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  assert child.returncode != 0 and 'KeyboardInterrupt' in stderr
  assert 'cannot schedule new futures' not in stderr
  assert stderr.count('Traceback') == 1, stderr[-3000:]
  if ft.Checkpoints(tmp_path).step('latest') is not None:
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # the interrupted save was completed, not left corrupt
      ft.restore_checkpoint(tmp_path, make_mlp_like_writer())


def make_mlp_like_writer():
  return ft.MLP(64, (512, 512), 10, rngs=nnx.Rngs(3))


EARLY_ERROR = '''
import pathlib, sys
import flaxtrain as ft
directory = pathlib.Path(sys.argv[1])
for index in range(20):  # what interrupted saves leave: orbax's temporary directories
  (directory / 'latest' / f'{index}.orbax-checkpoint-tmp-17000000{index:02d}' / 'model').mkdir(parents=True)
checkpoints = ft.Checkpoints(directory)
checkpoints.acquire()  # as fit does first; its managers list the directory
checkpoints.step('latest')
raise RuntimeError('an early error, before any save')
'''


def test_an_early_error_after_opening_a_writer_exits_with_its_own_traceback_only(tmp_path):
  import subprocess
  import sys
  for trial in range(3):
    directory = tmp_path / str(trial)
    result = subprocess.run([sys.executable, '-c', EARLY_ERROR, str(directory)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1 and 'RuntimeError: an early error' in result.stderr
    assert result.stderr.count('Traceback') == 1, result.stderr[-3000:]  # no orbax thread failing at exit
    assert not list((directory / 'latest').iterdir())  # the temporary directories went, synchronously


FULL_DISK = '''
import json, resource, signal, sys
import optax
from flax import nnx
import flaxtrain as ft
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as ENOSPC would
model = ft.MLP(64, (256,), 10, rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
checkpoints = ft.Checkpoints(sys.argv[1])
checkpoints.save(1, model, optimizer)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the disk is full
try:
  checkpoints.save(2, model, optimizer)
except ft.CheckpointError as error:
  print(json.dumps({'error': str(error)}), flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space is freed
checkpoints.save(3, model, optimizer)
checkpoints.close()
'''


def test_a_full_disk_fails_one_save_with_a_checkpoint_error_and_the_next_save_works(tmp_path):
  import json
  import subprocess
  import sys
  result = subprocess.run([sys.executable, '-c', FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  error = json.loads(result.stdout.strip().splitlines()[-1])['error']
  assert re.search(r'saving the latest checkpoint of step 2 to .* failed \(ValueError: .*File too large', error)
  assert ft.Checkpoints(tmp_path).steps('latest') == [1, 3]  # the half-written step 2 is not one
  with ft.Checkpoints(tmp_path) as writer:
    writer.acquire()  # the next writer removes what the failed save left
  assert sorted(p.name for p in (tmp_path / 'latest').iterdir()) == ['1', '3']
  assert ft.restore_checkpoint(tmp_path, ft.MLP(64, (256,), 10, rngs=nnx.Rngs(5))).step == 3


def test_a_history_cut_short_falls_back_to_the_checkpoint_whose_shorter_history_verifies(tmp_path):
  from flaxtrain.history import HistoryLog
  model = make_mlp()
  optimizer = make_optimizer(model)
  history = ft.History()
  with ft.Checkpoints(tmp_path, keep=3) as checkpoints:
    log = HistoryLog(tmp_path / 'history')
    for step in (1, 2, 3):  # as fit saves: append the new rows, store the segments in the metadata
      history.record_step(step, {'loss': 1.0 / step})
      checkpoints.save(step, model, optimizer, metadata={'history': log.write(history)})
    log.close()
  path = next((tmp_path / 'history').iterdir())
  path.write_bytes(path.read_bytes()[:-5])  # cut short inside the span of step 3

  def history_verifies(info):  # what fit passes: HistoryError is a ValueError, so the step is skipped
    HistoryLog.read(tmp_path / 'history', info.metadata['history'])

  with pytest.warns(RuntimeWarning, match=r'step 3: history: .*\.jsonl does not hold the \d+ bytes'):
    info = ft.Checkpoints(tmp_path).restore(make_mlp(), verify=history_verifies)
  assert info.step == 2
  restored = HistoryLog.read(tmp_path / 'history', info.metadata['history'])
  assert restored.state_dict()['steps'] == history.state_dict()['steps'][:2]
