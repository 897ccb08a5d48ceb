"""fit(): exact resume, interruption, non-finite losses, bad checkpoints, syncs and modes.

A tiny MLP with Dropout (so the RNG state matters) on a slice of digits: 128
training images in batches of 32 (4 steps per epoch) and 64 validation images.
"""

import os
import pathlib
import re
import shutil
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from orbax.checkpoint._src.path import atomicity  # pinned orbax: the commit step of a save

import flaxtrain as ft
from _trees import as_numpy, assert_trees_equal
import flaxtrain.loop

STEPS_PER_EPOCH = 4
EPOCHS = 4  # the reference run; resumed runs stop at EPOCHS // 2 first


@pytest.fixture(scope='module')
def digits():
  splits = ft.load_digits(seed=0)
  train = {k: v[:128] for k, v in splits.train.items()}
  val = {k: v[:64] for k, v in splits.val.items()}
  return train, val


def train_loader(digits, batch_size=32):
  return ft.DataLoader(digits[0], batch_size, seed=3)


def val_loader(digits):
  return ft.DataLoader(digits[1], 32, shuffle=False, remainder='pad')


def make_model(seed=0, hidden=(32,), dropout_rate=0.3):
  return ft.MLP(64, hidden, 10, dropout_rate=dropout_rate, rngs=nnx.Rngs(seed))


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 4, EPOCHS * STEPS_PER_EPOCH)


def make_tx():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(learning_rate=SCHEDULE))


def make_pair(seed=0, tx=None, **model_kwargs):
  model = make_model(seed, **model_kwargs)
  return model, nnx.Optimizer(model, tx or make_tx(), wrt=nnx.Param)


def fit(model, optimizer, loader, digits, **kwargs):
  kwargs = {'epochs': EPOCHS, 'val_loader': val_loader(digits), 'progress': False, 'log_every': 3, **kwargs}
  return ft.fit(model, optimizer, loader, **kwargs)


class Wrapped:
  """A DataLoader whose batch number ``at`` (counted over epochs from 0) misbehaves."""

  def __init__(self, loader, at, poison=False):
    self.loader, self.at, self.poison = loader, set(at), poison

  def __len__(self):
    return len(self.loader)

  def __getattr__(self, name):  # seed, batch_size, ...: the wrapped loader's
    return getattr(self.loader, name)

  def epoch(self, epoch, start=0):
    for index, batch in enumerate(self.loader.epoch(epoch, start), start=start):
      if epoch * len(self) + index in self.at:
        if not self.poison:
          raise KeyboardInterrupt
        batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
      yield batch


@pytest.fixture(scope='module')
def reference(digits, tmp_path_factory):
  """EPOCHS epochs in one uninterrupted call."""
  directory = tmp_path_factory.mktemp('reference')
  model, optimizer = make_pair()
  history = fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=directory)
  return types.SimpleNamespace(
      model=as_numpy(model), optimizer=as_numpy(optimizer), history=history.state_dict(),
      directory=directory, epochs=history.epochs(),
  )


def assert_same_as_reference(model, optimizer, history, reference):
  assert_trees_equal(as_numpy(model), reference.model)
  assert_trees_equal(as_numpy(optimizer), reference.optimizer)
  assert history.state_dict() == reference.history


def test_reference_run_records_every_step_and_epoch(reference):
  steps = ft.History.from_state_dict(reference.history).steps()
  np.testing.assert_array_equal(steps['step'], np.arange(EPOCHS * STEPS_PER_EPOCH))  # from 0, as optax counts
  assert {'loss', 'accuracy', 'grad_norm', 'learning_rate'} <= set(steps)
  # The rate recorded at step i is the one update i used: schedule(i).
  np.testing.assert_allclose(steps['learning_rate'], jax.vmap(SCHEDULE)(steps['step'].astype(np.int32)), rtol=1e-5, atol=1e-9)
  epochs = reference.epochs
  np.testing.assert_array_equal(epochs['step'], STEPS_PER_EPOCH * np.arange(1, EPOCHS + 1))
  assert {'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy'} <= set(epochs)
  # train_loss is the mean of the epoch's step losses.
  np.testing.assert_allclose(epochs['train_loss'], steps['loss'].reshape(EPOCHS, -1).mean(axis=1), rtol=1e-12)
  assert epochs['val_loss'][-1] < epochs['val_loss'][0]  # it learns
  ax = ft.plot_history(ft.History.from_state_dict(reference.history), 'accuracy')
  assert len(ax.get_lines()) == 3  # step, train epoch and val epoch curves


def test_resuming_n_epochs_to_2n_is_bit_identical_to_2n_uninterrupted(digits, tmp_path, reference):
  model, optimizer = make_pair(seed=0)
  first = fit(model, optimizer, train_loader(digits), digits, epochs=EPOCHS // 2, checkpoint_dir=tmp_path)
  assert len(first.epochs()['epoch']) == EPOCHS // 2
  # A new process would build a new model and optimizer: different initial values on purpose.
  model, optimizer = make_pair(seed=7)
  history = fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path)
  assert_same_as_reference(model, optimizer, history, reference)


def test_keyboard_interrupt_returns_the_history_and_keeps_the_last_checkpoint(digits, tmp_path, reference):
  model, optimizer = make_pair()
  interrupted = Wrapped(train_loader(digits), at=[STEPS_PER_EPOCH + 2])  # epoch 2, third batch
  history = fit(model, optimizer, interrupted, digits, checkpoint_dir=tmp_path)
  np.testing.assert_array_equal(history.steps()['step'], np.arange(STEPS_PER_EPOCH + 2))
  assert len(history.epochs()['epoch']) == 1

  fresh, fresh_optimizer = make_pair(seed=5)
  info = ft.restore_checkpoint(tmp_path, fresh, fresh_optimizer)
  assert info.step == STEPS_PER_EPOCH and (info.metadata['epoch'], info.metadata['batch']) == (1, 0)
  # Resuming with the plain loader ends exactly where the uninterrupted run did.
  history = fit(fresh, fresh_optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path)
  assert_same_as_reference(fresh, fresh_optimizer, history, reference)


def test_resuming_from_a_checkpoint_in_the_middle_of_an_epoch_is_exact(digits, tmp_path, reference):
  model, optimizer = make_pair()
  interrupted = Wrapped(train_loader(digits), at=[2 * STEPS_PER_EPOCH + 2])  # after 10 steps
  fit(model, optimizer, interrupted, digits, checkpoint_dir=tmp_path, checkpoint_every=3)
  info = ft.restore_checkpoint(tmp_path, make_model(seed=1))
  assert info.step == 9 and (info.metadata['epoch'], info.metadata['batch']) == (2, 1)

  model, optimizer = make_pair(seed=5)
  history = fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, checkpoint_every=3)
  assert_same_as_reference(model, optimizer, history, reference)


def test_a_crash_while_writing_a_checkpoint_resumes_from_the_last_good_one(digits, tmp_path, reference, monkeypatch):
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  crash_at = str(3 * STEPS_PER_EPOCH)

  async def crash_at_step_12(self, *args, **kwargs):
    if self.get_final().name == crash_at:  # step 12's files are written, never committed
      raise OSError('simulated crash during the write')
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', crash_at_step_12)
  model, optimizer = make_pair()
  with pytest.raises(ft.CheckpointError, match=r'saving the checkpoint of step 12 .* failed \(OSError: simulated crash') as caught:
    fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path)
  monkeypatch.undo()
  assert isinstance(caught.value.__cause__, OSError)
  assert len(caught.value.history) == 3 * STEPS_PER_EPOCH  # the history is kept, attached to the error
  assert len(caught.value.history.epochs()['epoch']) == 3
  assert any('.orbax-checkpoint-tmp' in p.name for p in tmp_path.glob('*/*'))  # the partial write
  assert ft.Checkpoints(tmp_path).step('latest') == 2 * STEPS_PER_EPOCH

  model, optimizer = make_pair(seed=5)
  history = fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path)
  assert_same_as_reference(model, optimizer, history, reference)


@pytest.mark.parametrize('log_every', [1, 100], ids=['log_every_step', 'log_at_epoch_end'])
def test_a_non_finite_loss_names_the_step_and_the_last_good_checkpoint(digits, tmp_path, log_every):
  model, optimizer = make_pair()
  poisoned = Wrapped(train_loader(digits), at=[STEPS_PER_EPOCH + 1], poison=True)  # step 5
  with pytest.raises(FloatingPointError) as raised:
    fit(model, optimizer, poisoned, digits, checkpoint_dir=tmp_path, log_every=log_every)
  last_good = tmp_path.resolve() / 'latest' / str(STEPS_PER_EPOCH)
  message = str(raised.value)
  # A NaN batch makes the gradients NaN; whether the compiled forward pass also makes the loss NaN
  # depends on how XLA fused it, so either may be reported.
  assert re.search(r'(loss was nan|gradients were not finite) at step 5 \(epoch 2, batch 2\)', message)
  assert f'last good checkpoint is {last_good}' in message
  assert raised.value.step == 5 and raised.value.checkpoint == last_good
  assert ft.Checkpoints(tmp_path).step('latest') == STEPS_PER_EPOCH  # nothing after the bad step was saved
  steps = raised.value.history.steps()
  assert not (np.isfinite(steps['loss'][5]) and np.isfinite(steps['grad_norm'][5]))


def test_a_non_finite_loss_without_checkpoints_says_so(digits):
  model, optimizer = make_pair()
  poisoned = Wrapped(train_loader(digits), at=[0], poison=True)
  with pytest.raises(FloatingPointError, match=r'at step 0 .*No checkpoint was written \(checkpoint_dir=None\)'):
    fit(model, optimizer, poisoned, digits, epochs=1)


def test_gradients_that_are_not_finite_stop_the_run_even_when_the_loss_looks_finite(digits):
  def loss_hiding_nans(model, batch):  # the outline's "fix": the loss looks finite, the gradients are NaN
    loss, aux = ft.classification_loss(model, batch)
    return jnp.nan_to_num(loss, nan=1e6, posinf=1e6, neginf=-1e6), aux

  model, optimizer = make_pair()
  poisoned = Wrapped(train_loader(digits), at=[2], poison=True)
  with pytest.raises(FloatingPointError, match=r'gradients were not finite at step 2 \(epoch 1, batch 3\): '
                     r'their norm was nan, although the loss was'):
    fit(model, optimizer, poisoned, digits, loss_fn=loss_hiding_nans, epochs=1, log_every=100)


def test_parameters_that_become_non_finite_stop_the_run(digits):
  model, optimizer = make_pair(tx=optax.sgd(learning_rate=float('nan')))  # finite gradients, NaN updates
  with pytest.raises(FloatingPointError, match=r'parameters became non-finite between step 0 .* and step 0, '
                     r'although every loss and gradient norm was finite'):
    fit(model, optimizer, train_loader(digits), digits, epochs=1, log_every=1)


@pytest.mark.parametrize('bad_step, log_every, steps_per_dispatch', [
    (2, 3, 1),  # the step right before a log: found at that log, not by the next step's loss
    (7, 100, 1),  # the last step of the run, every loss finite: found at the epoch's end
    (7, 100, 4),  # the same inside a stack of 4 steps per dispatch
])
def test_parameters_that_become_non_finite_at_the_step_before_a_log_are_found_at_that_log(
    digits, bad_step, log_every, steps_per_dispatch):
  """fit checks the parameters at each log, the end of an epoch included: not one log late."""
  rate = lambda count: jnp.where(count == bad_step, jnp.nan, 0.01)  # NaN updates at one step only
  model, optimizer = make_pair(tx=optax.sgd(rate))
  with pytest.raises(FloatingPointError, match=rf'parameters became non-finite between step \d+ .* and step {bad_step}, '
                     r'although every loss and gradient norm was finite') as raised:
    fit(model, optimizer, train_loader(digits), digits, epochs=2, log_every=log_every,
        steps_per_dispatch=steps_per_dispatch, val_loader=None, best_metric=None)
  assert np.isfinite(raised.value.history.steps()['loss']).all()


def test_apply_if_finite_skips_the_bad_step_and_training_goes_on(digits):
  tx = optax.apply_if_finite(make_tx(), max_consecutive_errors=3)
  model, optimizer = make_pair(tx=tx)
  poisoned = Wrapped(train_loader(digits), at=[5], poison=True)
  history = fit(model, optimizer, poisoned, digits)  # on_nonfinite=None: skips, as the optimizer does
  steps = history.steps()
  finite = np.isfinite(steps['loss']) & np.isfinite(steps['grad_norm'])
  np.testing.assert_array_equal(steps['step'][~finite], [5])
  assert int(optimizer.opt_state.total_notfinite[...]) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(as_numpy(model)))
  assert np.isfinite(history.epochs()['train_loss']).all()  # epoch means leave the skipped step out

  model, optimizer = make_pair(tx=tx)
  with pytest.raises(FloatingPointError, match='at step 5'):  # an explicit 'raise' still raises
    fit(model, optimizer, poisoned, digits, on_nonfinite='raise')


def test_when_apply_if_finite_gives_up_the_run_stops(digits):
  tx = optax.apply_if_finite(make_tx(), max_consecutive_errors=1)
  model, optimizer = make_pair(tx=tx)
  poisoned = Wrapped(train_loader(digits), at=[5, 6], poison=True)  # two bad steps in a row
  with pytest.raises(FloatingPointError, match=r'parameters became non-finite.*first step with a non-finite loss or gradient was step 5'):
    fit(model, optimizer, poisoned, digits, on_nonfinite='skip', log_every=1)


def test_validation_runs_in_evaluation_mode(digits):
  model, optimizer = make_pair(dropout_rate=0.5)
  history = fit(model, optimizer, train_loader(digits), digits, epochs=1)
  # Rebuild the network without Dropout, with the trained weights.
  plain = make_model(dropout_rate=0.0)
  nnx.update(plain, nnx.state(model, nnx.Param))
  images, labels = digits[1]['image'], digits[1]['label']
  want = optax.softmax_cross_entropy_with_integer_labels(plain(images), labels).mean()
  np.testing.assert_allclose(history.epochs()['val_loss'][0], want, rtol=1e-5)
  with_dropout = optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()
  assert abs(float(with_dropout) - float(want)) > 1e-3  # Dropout on would have given another loss


@pytest.mark.parametrize('log_every, syncs', [(1, 8), (3, 4), (100, 2)])
def test_metrics_come_off_the_device_once_per_logging_interval(digits, monkeypatch, log_every, syncs):
  calls = []

  def device_get(tree):
    calls.append(1)
    return jax.device_get(tree)

  monkeypatch.setattr(flaxtrain.loop, 'jax', types.SimpleNamespace(**{**vars(jax), 'device_get': device_get}))
  model, optimizer = make_pair()
  history = fit(model, optimizer, train_loader(digits), digits, epochs=2, val_loader=None, log_every=log_every)
  assert len(calls) == syncs  # 8 steps: at each multiple of log_every and at each epoch's end
  np.testing.assert_array_equal(history.steps()['step'], np.arange(8))


def test_progress_bar_shows_epoch_step_and_loss_and_can_be_turned_off(digits, capsys):
  model, optimizer = make_pair()
  fit(model, optimizer, train_loader(digits), digits, epochs=2, progress=True)
  err = capsys.readouterr().err
  assert 'epoch 2/2' in err and '8/8' in err and 'loss=' in err and 'val_acc=' in err
  model, optimizer = make_pair()
  fit(model, optimizer, train_loader(digits), digits, epochs=2, progress=False)
  assert capsys.readouterr().err == ''


def test_best_checkpoint_follows_best_metric_and_best_mode(digits, tmp_path, reference):
  val_acc = reference.epochs['val_accuracy']
  assert ft.Checkpoints(reference.directory).step('best') == reference.epochs['step'][np.argmax(val_acc)]
  # The worst training loss (best_mode='max' on a falling loss) is the first epoch's.
  model, optimizer = make_pair()
  history = fit(model, optimizer, train_loader(digits), digits, epochs=3, checkpoint_dir=tmp_path,
                best_metric='train_loss', best_mode='max')
  assert np.argmax(history.epochs()['train_loss']) == 0
  checkpoints = ft.Checkpoints(tmp_path)
  assert (checkpoints.step('best'), checkpoints.step('latest')) == (STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH)


def test_a_checkpoint_of_another_model_is_named_on_resume(digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  model, optimizer = make_pair(hidden=(16,))
  with pytest.raises(ValueError, match=r"model: 'hidden/0/(bias|kernel)' has shape"):
    fit(model, optimizer, train_loader(digits), digits, epochs=EPOCHS + 1, checkpoint_dir=tmp_path)


def test_a_corrupt_checkpoint_is_named_on_resume(digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  for step in (8, 12, 16):  # every checkpoint kept loses its optimizer state
    shutil.rmtree(tmp_path / 'latest' / str(step) / 'optimizer')
  step_dir = tmp_path / 'latest' / str(EPOCHS * STEPS_PER_EPOCH)
  model, optimizer = make_pair()
  with pytest.raises(ValueError, match=f'cannot read the checkpoint at {step_dir}'):
    fit(model, optimizer, train_loader(digits), digits, epochs=EPOCHS + 1, checkpoint_dir=tmp_path)


def test_resuming_with_another_data_order_is_refused(digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  model, optimizer = make_pair()
  with pytest.raises(ValueError, match='train_loader: differs from the one the checkpoint'):
    fit(model, optimizer, train_loader(digits, batch_size=16), digits, epochs=EPOCHS + 1, checkpoint_dir=tmp_path)


def test_resume_false_refuses_to_overwrite_a_checkpoint(digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  model, optimizer = make_pair()
  with pytest.raises(ValueError, match=r'checkpoint_dir: .* already holds a checkpoint .* resume=False'):
    fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, resume=False)


def test_a_finished_run_resumes_to_nothing_and_returns_its_history(digits, reference, tmp_path):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  model, optimizer = make_pair(seed=3)
  history = fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path)
  assert_same_as_reference(model, optimizer, history, reference)


@pytest.mark.parametrize('kwargs, error, message', [
    ({'epochs': 0}, ValueError, 'epochs: expected a positive int'),
    ({'log_every': 0}, ValueError, 'log_every: expected a positive int'),
    ({'checkpoint_every': -2}, ValueError, 'checkpoint_every: expected a positive int'),
    ({'best_mode': 'highest'}, ValueError, "best_mode: expected 'max' or 'min'"),
    ({'on_nonfinite': 'ignore'}, ValueError, "on_nonfinite: expected None, 'raise' or 'skip'"),
    ({'on_nonfinite': 'skip'}, ValueError, "on_nonfinite: 'skip' needs an optimizer"),
    ({'loss_fn': 'cross_entropy'}, TypeError, 'loss_fn: expected a callable'),
    ({'val_loader': iter([])}, TypeError, 'val_loader: expected something that can be iterated every epoch'),
    ({'train_loader': [{'image': 0}]}, TypeError, 'train_loader: expected a flaxtrain.DataLoader'),
    ({'optimizer': optax.adam(1e-3)}, TypeError, 'optimizer: expected an nnx.Optimizer'),
    ({'best_metric': 'val_f1'}, ValueError, r"best_metric: expected one of the epoch metrics \[.*'val_accuracy'"),
    ({'val_loader': None, 'best_metric': 'val_accuracy'}, ValueError, 'best_metric: .*pass a val_loader'),
    ({'keep': 0}, ValueError, 'keep: expected a positive int, got 0'),
    ({'accept_new_hyperparams': 'yes'}, TypeError, "accept_new_hyperparams: expected True or False, got 'yes'"),
    ({'resume': None}, TypeError, 'resume: expected True or False, got None'),
], ids=lambda v: str(v)[:30] if isinstance(v, dict) else None)
def test_bad_arguments_fail_before_any_training(digits, tmp_path, kwargs, error, message):
  model, optimizer = make_pair()
  before = as_numpy(model)
  arguments = {'optimizer': optimizer, 'train_loader': train_loader(digits), 'checkpoint_dir': tmp_path / 'run',
               'val_loader': val_loader(digits), 'progress': False, 'epochs': 1, **kwargs}
  with pytest.raises(error, match=message):
    ft.fit(model, arguments.pop('optimizer'), arguments.pop('train_loader'), **arguments)
  assert_trees_equal(as_numpy(model), before)
  assert not (tmp_path / 'run').exists()


# Checkpoints: nothing lost, nothing trusted silently ----------------------------------------------------


def flip_a_byte(step_dir):
  files = [p for p in (step_dir / 'model').rglob('*') if p.is_file()]
  data = max(files, key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0x04
  data.write_bytes(bytes(raw))


def tree_bytes(directory):
  return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob('*')) if p.is_file()}


def test_the_reference_run_keeps_its_last_three_checkpoints_and_a_history_written_once(reference):
  assert ft.Checkpoints(reference.directory).steps('latest') == [8, 12, 16]
  lines = [line for path in (reference.directory / 'history').glob('*.jsonl') for line in path.read_text().splitlines()]
  # Each save appended only the rows recorded since the previous one: every row is on disk exactly once.
  assert len(lines) == EPOCHS * STEPS_PER_EPOCH + EPOCHS


def test_a_corrupt_newest_checkpoint_is_set_aside_with_a_warning_and_the_run_resumes_from_the_one_before(
    digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  flip_a_byte(tmp_path / 'latest' / '16')
  model, optimizer = make_pair(seed=5)
  with pytest.warns(RuntimeWarning, match=r'skipped the checkpoint of step 16: .*latest/16 is corrupt: array model/'):
    history = fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path)
  assert_same_as_reference(model, optimizer, history, reference)  # epoch 4 again, from step 12
  assert (tmp_path / 'set_aside' / 'latest-16' / 'model').is_dir()  # moved, not deleted
  assert 'latest/16 is corrupt' in (tmp_path / 'set_aside' / 'latest-16.reason.txt').read_text()


def test_a_directory_with_a_best_but_no_latest_checkpoint_is_never_started_afresh(digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / 'latest')
  before = tree_bytes(tmp_path)
  for resume in (True, False):
    model, optimizer = make_pair()
    untouched = as_numpy(model)
    with pytest.raises(ValueError, match=r"holds \['best/\d+'.* but no latest checkpoint .* pass a new checkpoint_dir"):
      fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, resume=resume)
    assert_trees_equal(as_numpy(model), untouched)  # no training
  after = tree_bytes(tmp_path)
  after.pop(pathlib.Path('.lock'), None)
  before.pop(pathlib.Path('.lock'), None)
  assert after == before  # every file as it was


def test_a_run_never_falls_back_to_starting_afresh_when_no_checkpoint_verifies(digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  for step in (8, 12, 16):
    flip_a_byte(tmp_path / 'latest' / str(step))
  model, optimizer = make_pair()
  with pytest.raises(ValueError, match=r"no 'latest' checkpoint .* can be used \(step 16: .*step 12: .*step 8: "):
    fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=EPOCHS + 1)
  assert ft.Checkpoints(tmp_path).steps('latest') == [8, 12, 16]


def test_a_second_fit_on_the_same_directory_fails_at_once_and_kill_9_frees_it(digits, tmp_path):
  import signal
  import subprocess
  import sys
  holder = subprocess.Popen([sys.executable, '-c', (
      'import sys, time, flaxtrain as ft\n'
      'checkpoints = ft.Checkpoints(sys.argv[1])\n'
      'checkpoints.acquire()\n'
      'print("locked", flush=True)\n'
      'time.sleep(120)\n'), str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    model, optimizer = make_pair()
    untouched = as_numpy(model)
    with pytest.raises(ft.CheckpointError, match=f'in use by another writer \\(process {holder.pid} '):
      fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=1)
    assert_trees_equal(as_numpy(model), untouched)  # refused before any training
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=1)
  assert ft.Checkpoints(tmp_path).step('latest') == STEPS_PER_EPOCH


def constant_rate_pair(learning_rate, seed=0):
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
  return make_pair(seed=seed, tx=tx)


def test_a_different_constant_learning_rate_on_resume_is_an_error_unless_accepted(digits, tmp_path):
  model, optimizer = constant_rate_pair(1e-3)
  fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=1)
  model, optimizer = constant_rate_pair(1e-2, seed=1)
  with pytest.raises(ValueError, match=r'learning_rate \(opt_state/hyperparams/learning_rate\): 0\.01 in the '
                                       r'optimizer given, 0\.001 in the checkpoint.*accept_new_hyperparams=True'):
    fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=2)
  history = fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=2,
                accept_new_hyperparams=True)
  rates = history.steps()['learning_rate']
  np.testing.assert_allclose(rates[:STEPS_PER_EPOCH], 1e-3, rtol=1e-6)
  np.testing.assert_allclose(rates[STEPS_PER_EPOCH:], 1e-2, rtol=1e-6)  # the new rate is the one used
  model, optimizer = constant_rate_pair(1e-2, seed=2)  # and it is the run's rate from now on
  fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=3)


def test_an_unwritable_checkpoint_dir_fails_before_training(digits, tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied')

  monkeypatch.setattr(ft.checkpoint.tempfile, 'mkstemp', refuse)
  model, optimizer = make_pair()
  untouched = as_numpy(model)
  with pytest.raises(ft.CheckpointError, match='cannot write to .*make it writable or pass another checkpoint_dir') as caught:
    fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path / 'run')
  assert isinstance(caught.value.__cause__, PermissionError)
  assert_trees_equal(as_numpy(model), untouched)


def test_a_position_that_disagrees_with_the_step_is_refused(digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  model, optimizer = make_pair(seed=3)
  with ft.Checkpoints(tmp_path) as checkpoints:
    info = checkpoints.restore(model, optimizer)
    checkpoints.adopt()
    checkpoints.save(17, model, optimizer, metadata={**info.metadata, 'epoch': 2})  # says step 8
  with pytest.raises(ValueError, match=r'saved at step 17, but its metadata puts it at epoch 2, batch 0 .* disagree'):
    fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=EPOCHS + 1)


def test_fewer_epochs_than_already_done_is_an_error(digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  model, optimizer = make_pair()
  with pytest.raises(ValueError, match=r'epochs: the run in .* has already done 4 epochs \(16 steps\), more than '
                                       r'epochs=2; .*pass epochs > 4'):
    fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=2)


def test_resuming_with_another_best_metric_would_not_replace_the_best_checkpoint(digits, tmp_path, reference):
  shutil.copytree(reference.directory, tmp_path, dirs_exist_ok=True)
  model, optimizer = make_pair()
  with pytest.raises(ValueError, match=r"best_metric: the best checkpoint .* chosen by 'val_accuracy' \(max\)"):
    fit(model, optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path, epochs=EPOCHS + 1,
        best_metric='val_loss', best_mode='min')


# Data that does not fit: found before the first training step -------------------------------------------


class TupleLoader:
  def __init__(self, loader):
    self.loader = loader

  def __len__(self):
    return len(self.loader)

  def epoch(self, epoch, start=0):
    for batch in self.loader.epoch(epoch, start):
      yield batch['image'], batch['label']


def loss_ignoring_mask(model, batch):
  logits = model(batch['image'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  return loss, {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}


def with_label(data, index, label):
  labels = data['label'].copy()
  labels[index] = label
  return {**data, 'label': labels}


@pytest.mark.parametrize('case, error, message', [
    ('tuple_batches', TypeError, r"train_loader: expected batches that are dicts .*got a tuple of 2"),
    ('missing_key', ValueError, r"train_loader: .*\{'x': \(32, 8, 8, 1\), 'label': \(32,\)\}.*'image'"),
    ('custom_loss_missing_key', ValueError, r"train_loader: loss_fn reads batch\['tokens'\], but the batches hold "
                                            r"\{'image': \(32, 8, 8, 1\), 'label': \(32,\)\}"),
    ('label_minus_one', ValueError, r'train_loader: labels must be class indices in \[0, 10\) .*found 1 outside it, e\.g\. \[-1\]'),
    ('val_label_ten', ValueError, r'val_loader: labels must be class indices in \[0, 10\) .*e\.g\. \[10\]'),
    ('val_drops_examples', ValueError, r"val_loader: remainder='drop' evaluates only 32 of its 40 examples"),
    ('loss_ignores_mask', ValueError, r"loss_fn: ignores batch\['mask'\]: on a padded val_loader batch \(24 padding rows\)"),
    ('val_batches_do_not_fit', ValueError, r'val_loader: a batch .*\(32, 4, 4, 1\).* does not fit model and loss_fn'),
    ('bare_scalar_loss', TypeError, r'loss_fn: expected loss_fn\(model, batch\) to return a pair \(loss, aux\)'),
    ('per_example_loss', ValueError, r'loss_fn: expected a scalar loss .*got shape \(32,\)'),
])
def test_bad_data_is_named_before_any_training(digits, case, error, message):
  train, val = digits
  model, optimizer = make_pair()
  untouched = as_numpy(model)
  loader, kwargs = train_loader(digits), {'val_loader': val_loader(digits)}
  if case == 'tuple_batches':
    loader = TupleLoader(loader)
  elif case == 'missing_key':
    loader = ft.DataLoader({'x': train['image'], 'label': train['label']}, 32)
  elif case == 'custom_loss_missing_key':
    kwargs['loss_fn'] = lambda model, batch: (jnp.mean(model(batch['tokens'])), {})
  elif case == 'label_minus_one':
    loader = ft.DataLoader(with_label(train, 5, -1), 32, seed=3)
  elif case == 'val_label_ten':
    kwargs['val_loader'] = ft.DataLoader(with_label(val, 63, 10), 32, shuffle=False, remainder='pad')
  elif case == 'val_drops_examples':
    kwargs['val_loader'] = ft.DataLoader({k: v[:40] for k, v in val.items()}, 32)  # the defaults
  elif case == 'loss_ignores_mask':
    kwargs = {'val_loader': ft.DataLoader({k: v[:40] for k, v in val.items()}, 32, shuffle=False, remainder='pad'),
              'loss_fn': loss_ignoring_mask}
  elif case == 'val_batches_do_not_fit':
    kwargs['val_loader'] = [{'image': np.zeros((32, 4, 4, 1), np.float32), 'label': np.zeros(32, np.int32)}]
  elif case == 'bare_scalar_loss':
    kwargs['loss_fn'] = lambda model, batch: ft.classification_loss(model, batch)[0]
  elif case == 'per_example_loss':
    kwargs['loss_fn'] = lambda model, batch: (
        optax.softmax_cross_entropy_with_integer_labels(model(batch['image']), batch['label']), {})
  with pytest.raises(error, match=message):
    fit(model, optimizer, loader, digits, **kwargs)
  assert_trees_equal(as_numpy(model), untouched)


def test_a_loss_that_honours_the_mask_passes_the_padding_check(digits):
  def loss_fn(model, batch):
    logits = model(batch['image'])
    mask = batch.get('mask')
    return ft.softmax_cross_entropy_with_integer_labels(logits, batch['label'], mask), {'accuracy': ft.accuracy(logits, batch['label'], mask)}

  model, optimizer = make_pair()
  val = ft.DataLoader({k: v[:40] for k, v in digits[1].items()}, 32, shuffle=False, remainder='pad')
  history = fit(model, optimizer, train_loader(digits), digits, epochs=1, val_loader=val, loss_fn=loss_fn)
  assert history.epochs()['val_accuracy'].shape == (1,)


def test_a_label_out_of_range_inside_jit_gives_a_nan_loss_and_fit_names_the_step(digits):
  class BadLabelAt(Wrapped):  # a loader fit cannot look into: labels reach the device unchecked
    def epoch(self, epoch, start=0):
      for index, batch in enumerate(self.loader.epoch(epoch, start), start=start):
        if epoch * len(self) + index in self.at:
          batch = with_label(batch, 0, -1)
        yield batch

  model, optimizer = make_pair()
  with pytest.raises(FloatingPointError, match=r'the loss was nan at step 2 '):
    fit(model, optimizer, BadLabelAt(train_loader(digits), at=[2]), digits, epochs=1, val_loader=None)


def test_a_second_fit_on_an_unchanged_model_traces_nothing_again(digits):
  """fit's shape checks and its steps are reused by the next call: loss_fn is not traced again."""
  traced = []

  def loss_fn(model, batch):
    traced.append(1)  # runs only while JAX traces: compiled steps never call Python
    return ft.classification_loss(model, batch)

  model, optimizer = make_pair()
  ft.fit(model, optimizer, train_loader(digits), epochs=1, val_loader=val_loader(digits), loss_fn=loss_fn,
         progress=False)
  first = len(traced)
  ft.fit(model, optimizer, train_loader(digits), epochs=1, val_loader=val_loader(digits), loss_fn=loss_fn,
         progress=False)
  assert first > 0 and len(traced) == first


def test_a_model_changed_between_fit_calls_is_checked_afresh(digits):
  model, optimizer = make_pair()
  ft.fit(model, optimizer, train_loader(digits), epochs=1, progress=False)
  model.hidden[0] = nnx.Linear(32, 32, rngs=nnx.Rngs(1))  # now expects 32 inputs, the data has 64
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  with pytest.raises(ValueError, match='train_loader: a batch .* does not fit model and loss_fn'):
    ft.fit(model, optimizer, train_loader(digits), epochs=1, progress=False)


# One public core: compiled once per structure, checkpoints without validation, Ctrl-C taken safely ------------


def test_a_new_model_of_a_structure_already_trained_compiles_nothing(digits):
  """fit's step, eval step and checks are compiled per structure: fresh objects reuse them."""
  model, optimizer = make_pair(seed=0)
  fit(model, optimizer, train_loader(digits), digits, epochs=1)
  fresh, fresh_optimizer = make_pair(seed=1)
  with ft.debug.count_compilations() as compiled:
    fit(fresh, fresh_optimizer, train_loader(digits), digits, epochs=1)
    fit(fresh, fresh_optimizer, train_loader(digits), digits, epochs=1)  # the same objects again
  assert compiled.names == [], f'compiled again: {compiled.names}'
  with ft.debug.count_compilations() as compiled:  # a new structure does compile: the counter can fail
    other, other_optimizer = make_pair(seed=1, hidden=(16,))
    fit(other, other_optimizer, train_loader(digits), digits, epochs=1)
  assert 'jit(train_arrays)' in compiled.names


def test_fit_leaves_arrays_shared_before_it_valid(digits):
  """fit donates its own copy: a clone and a kept array of the model stay usable."""
  model, optimizer = make_pair()
  kept = model.out.kernel[...]
  twin = nnx.clone(model)
  fit(model, optimizer, train_loader(digits), digits, epochs=1)
  assert not kept.is_deleted()
  np.testing.assert_array_equal(twin.out.kernel[...], kept)
  assert not np.array_equal(model.out.kernel[...], kept)


def test_a_run_without_validation_checkpoints_its_latest_state_by_default(digits, tmp_path):
  model, optimizer = make_pair()
  history = fit(model, optimizer, train_loader(digits), digits, epochs=2, val_loader=None, checkpoint_dir=tmp_path)
  assert ft.Checkpoints(tmp_path).step('latest') == 2 * STEPS_PER_EPOCH
  assert ft.Checkpoints(tmp_path).step('best') is None
  assert 'val_loss' not in history.epochs()


def test_an_empty_checkpoint_dir_is_refused_instead_of_writing_into_the_current_directory(digits):
  model, optimizer = make_pair()
  with pytest.raises(ValueError, match=r"checkpoint_dir: expected a directory path or None, got an empty path"):
    fit(model, optimizer, train_loader(digits), digits, checkpoint_dir='')


@pytest.mark.parametrize('change, message', [
    (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(
        learning_rate=optax.warmup_cosine_decay_schedule(0.0, 1e-2, 4, EPOCHS * STEPS_PER_EPOCH))),
     'its learning-rate schedule, clipping or weight decay changed'),  # another peak rate
    (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(
        learning_rate=optax.warmup_cosine_decay_schedule(0.0, 3e-3, 4, 10 * EPOCHS * STEPS_PER_EPOCH))),
     'its learning-rate schedule, clipping or weight decay changed'),  # a longer decay
    (lambda: optax.chain(optax.clip_by_global_norm(0.1), optax.inject_hyperparams(optax.adamw)(
        learning_rate=SCHEDULE)), 'its learning-rate schedule, clipping or weight decay changed'),
])
def test_a_changed_schedule_or_clipping_on_resume_is_an_error_unless_accepted(digits, tmp_path, change, message):
  model, optimizer = make_pair()
  fit(model, optimizer, train_loader(digits), digits, epochs=1, checkpoint_dir=tmp_path)
  model, optimizer = make_pair(tx=change())
  with pytest.raises(ValueError, match=f'optimizer: differs from that of the run saved at .*{message}'):
    fit(model, optimizer, train_loader(digits), digits, epochs=2, checkpoint_dir=tmp_path)
  history = fit(model, optimizer, train_loader(digits), digits, epochs=2, checkpoint_dir=tmp_path,
                accept_new_hyperparams=True)
  assert len(history.epochs()['epoch']) == 2


def test_the_same_optimizer_built_again_resumes_without_complaint(digits, tmp_path):
  model, optimizer = make_pair()
  fit(model, optimizer, train_loader(digits), digits, epochs=1, checkpoint_dir=tmp_path)
  model, optimizer = make_pair(seed=4)
  history = fit(model, optimizer, train_loader(digits), digits, epochs=2, checkpoint_dir=tmp_path)
  assert len(history.epochs()['epoch']) == 2


def test_a_run_saved_with_loss_scaling_does_not_resume_silently_without_it(digits, tmp_path):
  model, optimizer = make_pair()
  fit(model, optimizer, train_loader(digits), digits, epochs=1, checkpoint_dir=tmp_path,
      loss_scale=ft.dynamic_loss_scale())
  model, optimizer = make_pair()
  with pytest.raises(ValueError, match='loss_scale: the run saved at .* was trained with dynamic loss scaling, '
                                       'and this run has none'):
    fit(model, optimizer, train_loader(digits), digits, epochs=2, checkpoint_dir=tmp_path)


class SigintAt:
  """A loader that sends this process a real SIGINT (Ctrl-C) while yielding batch ``at``."""

  def __init__(self, loader, at):
    self.loader, self.at = loader, at

  def __len__(self):
    return len(self.loader)

  def __getattr__(self, name):
    return getattr(self.loader, name)

  def epoch(self, epoch, start=0):
    for index, batch in enumerate(self.loader.epoch(epoch, start), start=start):
      if epoch * len(self) + index == self.at:
        os.kill(os.getpid(), signal.SIGINT)
      yield batch


def test_a_real_ctrl_c_stops_between_dispatches_and_leaves_the_model_whole(digits, tmp_path, reference):
  model, optimizer = make_pair()
  history = fit(model, optimizer, SigintAt(train_loader(digits), at=STEPS_PER_EPOCH + 1), digits,
                checkpoint_dir=tmp_path)
  steps = history.steps()['step']
  assert STEPS_PER_EPOCH + 1 <= len(steps) < 2 * STEPS_PER_EPOCH  # stopped within the second epoch
  assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state((model, optimizer))))
  fresh, fresh_optimizer = make_pair(seed=5)
  history = fit(fresh, fresh_optimizer, train_loader(digits), digits, checkpoint_dir=tmp_path)
  assert_same_as_reference(fresh, fresh_optimizer, history, reference)
