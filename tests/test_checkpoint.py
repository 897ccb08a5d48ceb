"""Checkpoints: exact round trips, latest and best, clear errors, atomic writes, no pickle."""

import os
import pathlib
import re
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from orbax.checkpoint._src.path import atomicity  # pinned orbax: the commit step of a save

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


def test_latest_and_best_are_kept_and_nothing_else(tmp_path):
  model = make_mlp()
  optimizer = make_optimizer(model)
  kernels = {}
  with ft.Checkpoints(tmp_path) as checkpoints:
    for step, best in [(1, True), (2, False), (3, True), (4, False)]:
      train(model, optimizer, steps=1, first_seed=step)
      kernels[step] = as_numpy(model)['out']['kernel']
      checkpoints.save(step, model, optimizer, best=best)
    assert checkpoints.step('latest') == 4 and checkpoints.step('best') == 3
  assert sorted(os.listdir(tmp_path / 'latest')) == ['4']
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


def test_a_crash_before_the_commit_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
  model = make_mlp()
  optimizer = make_optimizer(model)
  train(model, optimizer, steps=1)
  good = as_numpy(model)
  checkpoints = ft.Checkpoints(tmp_path)
  checkpoints.save(1, model, optimizer)
  train(model, optimizer, steps=1, first_seed=1)

  async def crash(self, *args, **kwargs):  # every file is written; the rename never happens
    raise OSError('simulated crash before the commit')

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', crash)
  with pytest.raises(OSError, match='simulated crash'):
    checkpoints.save(2, model, optimizer)
  monkeypatch.undo()

  leftovers = [p.name for p in (tmp_path / 'latest').iterdir() if p.name != '1']
  assert leftovers and all('.orbax-checkpoint-tmp' in name for name in leftovers)
  reopened = ft.Checkpoints(tmp_path)
  assert reopened.step('latest') == 1
  fresh = make_mlp(seed=4)
  reopened.restore(fresh)
  assert_trees_equal(as_numpy(fresh), good)
  reopened.save(2, model, optimizer)  # the next save succeeds, and replaces step 1 only now
  reopened.close()
  assert sorted(os.listdir(tmp_path / 'latest')) == ['2']


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
], ids=['negative_step', 'float_step', 'not_an_optimizer', 'bad_which', 'not_a_model', 'bad_directory'])
def test_bad_arguments_are_named(tmp_path, call, error, message):
  model = make_mlp()
  with pytest.raises(error, match=message):
    call(ft.Checkpoints(tmp_path), model, make_optimizer(model))
  assert not (tmp_path / 'latest').exists()
