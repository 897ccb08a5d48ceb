"""Checkpoints of a training run with orbax: the last few and the best one.

A checkpoint holds everything a run needs to continue exactly where it
stopped: the model's whole state (parameters, BatchNorm statistics and the
Dropout RNG key and counter), the optimizer's state (its step count, moments
and, with ``optax.inject_hyperparams``, the learning rate), and a JSON
``metadata`` dict chosen by the caller (``fit`` stores the data position
there). Arrays go through orbax and tensorstore, the metadata through JSON:
nothing is pickled.

A checkpoint directory looks like this::

    checkpoint_dir/
      .lock                                           # held by the one writer
      latest/<step>/   model/  optimizer/  metadata/  checksums/
      best/<step>/     ...                            # the best one so far
      history/         *.jsonl                        # fit(): the history, append-only
      set_aside/       latest-<step>/  best-<step>/   # checkpoints that failed to verify or were abandoned

Nothing is trusted or lost silently:

* **Checksums.** Every saved array (and the metadata) has a SHA-256 checksum
  recorded at save time and verified on restore; a mismatch names the array.
* **Several latest checkpoints.** The last ``keep`` are kept (orbax's
  ``LatestN`` preservation policy); restoring the latest tries them newest
  first, and warns for each one it skips, saying why.
* **The best is a copy of its own.** ``best/<step>`` is written separately
  from ``latest/<step>``, so it survives a corrupt or set-aside latest
  checkpoint of the same step.
* **One writer.** Saving takes an OS-level lock on ``.lock`` (``fcntl.flock``
  on Linux and macOS, ``msvcrt.locking`` on Windows) and holds it until
  :meth:`Checkpoints.close`; the OS releases it when the process dies, even by
  ``kill -9``. A second writer fails at once.
* **Only its own checkpoints are deleted.** A :class:`Checkpoints` deletes
  (when rotating) only checkpoints it wrote or was told to :meth:`adopt`.
* **Atomic writes.** orbax writes a step into ``<step>.orbax-checkpoint-tmp-*``
  and renames it to ``<step>`` only once every file is complete. A crash
  mid-write leaves a temporary directory, which is ignored, and removed by the
  next writer.
* **Nothing is moved silently.** A checkpoint is never overwritten: one that
  is in the way (it failed to verify, or it belongs to a timeline a resumed
  run abandoned) is moved to ``set_aside/`` with a ``RuntimeWarning``.
* **Ctrl-C waits for a save.** An interrupt that arrives while orbax writes
  or reads is held until it is done, then raised: no half-started orbax
  thread keeps the process from exiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flaxtrain import checks

try:  # Linux and macOS
  import fcntl
except ImportError:  # Windows
  fcntl = None
  import msvcrt  # pylint: disable=import-error

__all__ = ['CheckpointError', 'CheckpointInfo', 'Checkpoints', 'restore_checkpoint']

_KINDS = ('latest', 'best')
_LOCK = '.lock'
_TEMPORARY = '.orbax-checkpoint-tmp'  # orbax's on-disk name for a step still being written
_HISTORY_FILE = re.compile(r'history/[0-9a-f]{32}\.jsonl')  # the files HistoryLog writes
_READ_ATTEMPTS = 5  # restores that lose a race with a rotating writer are retried this often


class CheckpointError(RuntimeError):
  """A checkpoint directory cannot be used: it is in use, read-only, a save failed, or it changed while read.

  When raised by :func:`flaxtrain.fit`, ``error.history`` holds the
  :class:`flaxtrain.History` recorded so far, and ``error.__cause__`` the
  underlying error.
  """

  history: Any = None


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """What :meth:`Checkpoints.restore` read, besides the arrays it restored.

  Attributes:
    step: the step the checkpoint was saved at.
    path: its directory.
    metadata: the JSON ``metadata`` dict given to :meth:`Checkpoints.save`.
    skipped: ``(step, reason)`` for each newer checkpoint that failed to
      verify (or was refused by ``verify``) and was skipped.
  """

  step: int
  path: pathlib.Path
  metadata: dict[str, Any]
  skipped: tuple[tuple[int, str], ...] = ()

  def __repr__(self) -> str:
    keys = ', '.join(sorted(map(str, self.metadata)))
    skipped = f', skipped steps {[s for s, _ in self.skipped]}' if self.skipped else ''
    return f'CheckpointInfo(step={self.step}, path={str(self.path)!r}, metadata keys [{keys}]{skipped})'


class _Unusable(ValueError):
  """A checkpoint that cannot be read or fails its checksums: restore may skip it."""


class _Vanished(Exception):
  """A checkpoint deleted (by a rotating writer) while it was being read."""


def _pure_state(node: nnx.Module | nnx.Optimizer) -> dict[str, Any]:
  """The whole state of a model or optimizer as nested dicts of arrays."""
  return nnx.to_pure_dict(nnx.state(node))


def _key(path: tuple[Any, ...]) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _spec(x: Any) -> tuple[tuple[int, ...], str]:
  """(shape, dtype) as stored: a PRNG key array is stored as its key data."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.eval_shape(jax.random.key_data, x)
  return tuple(x.shape), str(jnp.dtype(x.dtype))


def _checksums(tree: Any) -> dict[str, str]:
  """SHA-256 of every array in ``tree`` (dtype, shape and bytes), by its path."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys = [_key(path) for path, _ in flat]
  arrays = [jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for _, x in flat]
  result = {}
  for key, array in zip(keys, jax.device_get(arrays)):
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f'{array.dtype.str}{array.shape}'.encode())
    digest.update(array.tobytes())
    result[key] = digest.hexdigest()
  return result


def _json_checksum(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _some(keys: list[str]) -> str:
  shown = ', '.join(repr(k) for k in keys[:3])
  return shown + (f' and {len(keys) - 3} more' if len(keys) > 3 else '')


def _check_compatible(name: str, target: Any, stored: Any, path: pathlib.Path) -> None:
  """Raises ValueError naming the first leaf where ``target`` and ``stored`` differ."""
  want = {_key(p): _spec(x) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  have = {_key(p): _spec(x) for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing:
    raise ValueError(
        f'{name}: the checkpoint at {path} has no {_some(missing)}, which {name} has. '
        f'Was it saved from a different {name}?'
    )
  if extra:
    raise ValueError(
        f'{name}: the checkpoint at {path} holds {_some(extra)}, which {name} does not have. '
        f'Was it saved from a different {name}?'
    )
  for key, (shape, dtype) in want.items():
    if have[key] != (shape, dtype):
      raise ValueError(
          f'{name}: {key!r} has shape {shape} and dtype {dtype} in {name}, but the checkpoint '
          f'at {path} holds shape {have[key][0]} and dtype {have[key][1]}'
      )


def _unreadable(path: pathlib.Path, error: BaseException) -> _Unusable | _Vanished:
  if not path.exists():
    return _Vanished(str(path))
  message = str(error).strip().splitlines()[0] if str(error).strip() else ''
  return _Unusable(
      f'cannot read the checkpoint at {path} ({type(error).__name__}: {message:.300}); '
      'its files are incomplete or corrupt'
  )


def _verify(path: pathlib.Path, restored: Mapping[str, Any], names: list[str]) -> None:
  """Raises _Unusable naming the first array whose checksum differs from the recorded one."""
  recorded = restored.get('checksums')
  if not isinstance(recorded, Mapping):
    raise _Unusable(f'the checkpoint at {path} has no checksums (saved by an older flaxtrain), so it cannot be verified')
  if recorded.get('metadata') != _json_checksum(restored['metadata']):
    raise _Unusable(
        f"the checkpoint at {path} is corrupt: its metadata does not match the checksum recorded "
        'when it was saved (was it edited by hand?)'
    )
  for name in names:
    want = recorded.get(name) or {}
    have = _checksums(restored[name])
    for key in sorted(set(want) | set(have)):
      if want.get(key) != have.get(key):
        raise _Unusable(
            f'the checkpoint at {path} is corrupt: array {name}/{key} does not match the SHA-256 '
            'checksum recorded when it was saved (its bytes changed on disk)'
        )


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
  """Holds Ctrl-C (SIGINT) back until the block is done, then raises it.

  orbax starts and joins threads while it writes and reads; a
  KeyboardInterrupt raised in the middle of that can leave a thread that
  keeps the interpreter from exiting. Only the main thread receives signals,
  so elsewhere (and where SIGINT is ignored or left to the OS) nothing changes.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.getsignal(signal.SIGINT)
  if not callable(previous):
    yield
    return
  received: list[tuple[int, Any]] = []
  signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    if received:
      previous(*received[0])  # the default handler raises KeyboardInterrupt here


class _DropReadOnlyNotice(logging.Filter):
  """Drops orbax's notice that a reader's manager is read-only: that is how a reader opens it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


@contextlib.contextmanager
def _quiet_read_only_notice() -> Iterator[None]:
  logger, dropped = logging.getLogger('absl'), _DropReadOnlyNotice()
  logger.addFilter(dropped)
  try:
    yield
  finally:
    logger.removeFilter(dropped)


@dataclasses.dataclass
class _NotOwned:
  """An orbax preservation policy: keeps every step this writer neither wrote nor adopted."""

  owned: set[int]

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    return [info.step not in self.owned for info in checkpoints]


def _try_lock(file: Any) -> None:
  """An exclusive, non-blocking lock on ``file``; the OS drops it when the process dies."""
  if fcntl is not None:
    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  else:
    file.seek(0)
    msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)


_HELD = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK, getattr(errno, 'EDEADLOCK', errno.EDEADLK)}


class _Lock:
  """An exclusive OS lock on a file (``flock``, or ``msvcrt.locking`` on Windows)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.file = None

  def acquire(self) -> None:
    if self.file is not None:
      return
    file = open(self.path, 'a+')  # pylint: disable=consider-using-with  # held until release()
    try:
      _try_lock(file)
    except OSError as error:
      try:
        file.seek(0)
        holder = file.read().strip() or 'another process'
      except OSError:  # Windows: the holder's locked byte cannot be read
        holder = 'another process'
      file.close()
      if error.errno not in _HELD:
        raise
      raise CheckpointError(
          f'checkpoint_dir: {self.path.parent} is in use by another writer ({holder}). Only one '
          'run may write a checkpoint directory at a time: wait for it to finish (or stop it), '
          'or pass another checkpoint_dir'
      ) from error
    try:
      file.seek(0)
      file.truncate()
      now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
      file.write(f'process {os.getpid()} on {socket.gethostname()}, since {now}\n')
      file.flush()
    except OSError:  # a full disk: let go of the lock rather than hold it unnamed
      file.close()
      raise
    self.file = file

  def release(self) -> None:
    if self.file is not None:
      file, self.file = self.file, None
      try:
        file.close()  # closing the file releases the lock, even if the close reports an error
      except OSError:
        pass


class Checkpoints:
  """The last ``keep`` checkpoints and the best one of a run, in one directory.

  Reading (:meth:`step`, :meth:`restore`, :meth:`blocking_contents`) needs no
  lock and changes nothing. The first :meth:`save` (or :meth:`acquire`) takes
  the directory's writer lock, which is held until :meth:`close`.

  Args:
    directory: where the checkpoints live. It is created by the first
      :meth:`save`; restoring from a directory that does not exist raises
      FileNotFoundError.
    keep: how many latest checkpoints to keep (a positive int); older ones
      written by this object are deleted after each save.

  Example:
    >>> checkpoints = Checkpoints('/tmp/run', keep=3)                 # doctest: +SKIP
    >>> checkpoints.save(100, model, optimizer, metadata={'epoch': 3}, best=True)  # doctest: +SKIP
    >>> info = checkpoints.restore(model, optimizer, which='best')    # doctest: +SKIP
    >>> info.step, info.metadata['epoch']                             # doctest: +SKIP
    (100, 3)
  """

  def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3):
    if not isinstance(directory, (str, os.PathLike)):
      raise TypeError(f'directory: expected a path, got {type(directory).__name__} {directory!r:.60}')
    if not os.fspath(directory):
      raise ValueError("directory: expected a path, got '' (pass '.' for the current directory)")
    self.keep = checks.check_int('keep', keep)
    self.directory = pathlib.Path(directory).expanduser().resolve()
    if self.directory.exists() and not self.directory.is_dir():
      raise NotADirectoryError(f'directory: expected a directory, got the file {self.directory}')
    self._managers: dict[str, ocp.CheckpointManager] = {}
    self._lock = _Lock(self.directory / _LOCK)
    self._owned: dict[str, set[int]] = {kind: set() for kind in _KINDS}

  # Locking -------------------------------------------------------------------

  @property
  def writing(self) -> bool:
    """Whether this object holds the directory's writer lock."""
    return self._lock.file is not None

  def acquire(self) -> None:
    """Takes the writer lock and checks that the directory can be written.

    Raises:
      CheckpointError: another process (or another :class:`Checkpoints` in
        this one) holds the lock, or the directory cannot be written (a full
        disk included); the underlying OSError is its ``__cause__``.
    """
    if self.writing:
      return
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
      raise CheckpointError(f'checkpoint_dir: cannot create {self.directory} ({error})') from error
    try:
      self._lock.acquire()
    except OSError as error:
      raise CheckpointError(f'checkpoint_dir: cannot write to {self.directory} ({error})') from error
    try:
      for kind in _KINDS:
        path = self.directory / kind
        path.mkdir(exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix='.write-test-')
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
      self._lock.release()
      raise CheckpointError(
          f'checkpoint_dir: cannot write to {self.directory} ({type(error).__name__}: {error}); '
          'make it writable or pass another checkpoint_dir'
      ) from error
    self._close_managers()  # reopen them as a writer
    self._remove_temporary()  # what a crash mid-save left behind

  def _remove_temporary(self) -> list[str]:
    """Deletes orbax's temporary directories of unfinished saves (the lock holder only).

    Done here, synchronously, rather than by orbax's ``cleanup_tmp_directories``,
    which runs on a background thread that a manager's ``close()`` does not
    wait for: a process that stopped early (an error, Ctrl-C) then printed
    "cannot schedule new futures after interpreter shutdown" at exit.
    """
    removed = []
    with _interrupts_held():
      for kind in _KINDS:
        for path in sorted((self.directory / kind).glob(f'*{_TEMPORARY}*')):
          shutil.rmtree(path, ignore_errors=True)
          removed.append(path.relative_to(self.directory).as_posix())
    return removed

  def adopt(self) -> None:
    """Lets this writer delete (when rotating) the checkpoints already in the directory.

    :func:`flaxtrain.fit` calls it when it resumes a run, which makes the
    resumed run's checkpoints its own.
    """
    for kind in _KINDS:
      self._owned[kind].update(self.steps(kind))

  # What is in the directory ----------------------------------------------------

  def _entries(self) -> list[str]:
    """Files in the directory, grouped by their first two path parts ('best/12', 'notes.txt').

    The lock, empty folders, orbax's temporary directories and write tests
    are left out: none of them holds anything of value.
    """
    if not self.directory.is_dir():
      return []
    found = set()
    for path in self.directory.rglob('*'):
      name = path.relative_to(self.directory).as_posix()
      if name == _LOCK or _TEMPORARY in name or '.write-test-' in name or not path.is_file():
        continue
      found.add('/'.join(name.split('/')[:2]))
    return sorted(found)

  def blocking_contents(self) -> list[str]:
    """What in the directory must keep a new run from starting there.

    A new run may start in a directory that is empty, or that holds only the
    leftovers of a run that never completed its first checkpoint: the lock,
    orbax's temporary directories of an interrupted first save, write tests,
    and history files (``history/<hex>.jsonl``) when no checkpoint at all is
    there. Everything else blocks it: a latest or best checkpoint, anything
    in ``set_aside/``, any file of someone else's.

    Returns:
      The blocking entries, sorted, each as its first two path parts
      relative to the directory (``'best/12'``, ``'set_aside/latest-16'``,
      ``'notes.txt'``); empty if a new run may start.

    Example:
      >>> ft.Checkpoints('runs/new').blocking_contents()             # doctest: +SKIP
      []
    """
    found = self._entries()
    if not any(name.split('/')[0] in (*_KINDS, 'set_aside') for name in found):
      found = [name for name in found if not _HISTORY_FILE.fullmatch(name)]
    return found

  def discard_leftovers(self) -> list[str]:
    """Deletes the leftovers of a run that never completed a checkpoint, so a new run can start.

    Takes the writer lock (so no other run is writing them). Deletes orbax's
    temporary directories, and the history files when the directory holds no
    checkpoint; nothing that :meth:`blocking_contents` lists is touched.

    Returns:
      What was deleted, relative to the directory.

    Raises:
      CheckpointError: the directory is in use by another writer, or cannot
        be written.
    """
    self.acquire()
    self._close_managers()
    removed = self._remove_temporary()
    with _interrupts_held():
      blocking = set(self.blocking_contents())
      for name in self._entries():
        if name not in blocking and _HISTORY_FILE.fullmatch(name):
          (self.directory / name).unlink()
          removed.append(name)
    return removed

  # Reading ---------------------------------------------------------------------

  def _manager(self, kind: str, create: bool = False) -> ocp.CheckpointManager | None:
    """The orbax manager of ``kind``; None if its directory does not exist yet."""
    if kind not in self._managers:
      path = self.directory / kind
      if not (create or path.is_dir()):
        return None
      writer = self.writing
      keep = self.keep if kind == 'latest' else 1
      policies = ocp.checkpoint_managers
      options = ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False,  # a save is complete when save() returns
          # After each save orbax deletes what no policy preserves: the steps
          # beyond the newest `keep`, but never one this object did not write.
          preservation_policy=policies.AnyPreservationPolicy(
              [policies.LatestN(n=keep), _NotOwned(self._owned[kind])]) if writer else None,
          save_interval_steps=0 if not writer else 1,  # a reader saves nothing
          cleanup_tmp_directories=False,  # acquire() does it, synchronously
          create=writer,
          read_only=not writer,
      )
      handlers = {
          'model': ocp.StandardCheckpointHandler(),
          'optimizer': ocp.StandardCheckpointHandler(),
          'metadata': ocp.JsonCheckpointHandler(),
          'checksums': ocp.JsonCheckpointHandler(),
      }
      with _interrupts_held(), _quiet_read_only_notice():
        self._managers[kind] = ocp.CheckpointManager(path, options=options, item_handlers=handlers)
    return self._managers[kind]

  def steps(self, which: Literal['latest', 'best'] = 'latest') -> list[int]:
    """The steps of the complete ``which`` checkpoints in the directory, oldest first."""
    if which not in _KINDS:
      raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
    for _ in range(_READ_ATTEMPTS):
      try:
        manager = self._manager(which)
        if manager is None:
          return []
        with _interrupts_held():  # orbax lists the steps on a thread pool
          manager.reload()
        return sorted(manager.all_steps())
      except OSError as error:  # a step was deleted while orbax listed it (a writer rotating): list again
        failure = error
        self._close_managers()
        time.sleep(0.02)
    raise CheckpointError(
        f'checkpoint directory: cannot list the checkpoints in {self.directory / which} '
        f'({type(failure).__name__}: {failure}), {_READ_ATTEMPTS} times; if a writer is rotating them, '
        'list again'
    ) from failure

  def step(self, which: Literal['latest', 'best'] = 'latest') -> int | None:
    """The step of the newest ``which`` checkpoint, or None if there is none."""
    steps = self.steps(which)
    return steps[-1] if steps else None

  def path(self, which: Literal['latest', 'best'] = 'latest') -> pathlib.Path | None:
    """The directory of the newest ``which`` checkpoint, or None if there is none."""
    step = self.step(which)
    return None if step is None else self.directory / which / str(step)

  # Writing ---------------------------------------------------------------------

  def save(
      self,
      step: int,
      model: nnx.Module,
      optimizer: nnx.Optimizer,
      *,
      metadata: Mapping[str, Any] | None = None,
      best: bool = False,
  ) -> pathlib.Path:
    """Writes ``model``, ``optimizer`` and ``metadata`` as the latest checkpoint.

    The latest checkpoint is written first, then (with ``best``) the best.
    After each write, latest checkpoints beyond the last ``keep`` (and the
    previous best) are deleted, if this object wrote (or adopted) them. A
    Ctrl-C during the save is held until the save is complete.

    Args:
      step: a step number not yet in the directory.
      model: its whole ``nnx.state`` is saved, RNG state included.
      optimizer: an ``nnx.Optimizer``; its whole state is saved.
      metadata: a JSON-serialisable dict, returned by :meth:`restore`.
      best: also write it as the best checkpoint.

    Returns:
      The directory of the latest checkpoint. It is complete on return.

    Raises:
      CheckpointError: the directory is locked by another writer or cannot be
        written, or ``step`` is already a latest checkpoint there (nothing
        is overwritten).
    """
    metadata = self._check_save(step, model, optimizer, metadata)
    self._write(step, model, optimizer, metadata, ('latest', 'best') if best else ('latest',))
    return self.directory / 'latest' / str(step)

  def save_best(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
                metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes ``model``, ``optimizer`` and ``metadata`` as the best checkpoint only.

    For a run that stopped between writing the latest and the best copy of
    one step (:func:`flaxtrain.fit` finishes the job when it resumes). A best
    checkpoint already at ``step`` (written by a timeline that a resumed run
    abandoned) is set aside with a RuntimeWarning, never overwritten.

    Returns:
      The directory of the best checkpoint.
    """
    metadata = self._check_save(step, model, optimizer, metadata)
    self._write(step, model, optimizer, metadata, ('best',))
    return self.directory / 'best' / str(step)

  @staticmethod
  def _check_save(step: Any, model: Any, optimizer: Any, metadata: Any) -> dict[str, Any]:
    checks.check_int('step', step, minimum=0)
    if not isinstance(model, nnx.Module):
      raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f'optimizer: expected an nnx.Optimizer, got {type(optimizer).__name__}')
    if metadata is not None and not isinstance(metadata, Mapping):
      raise TypeError(f'metadata: expected a JSON-serialisable dict, got {type(metadata).__name__}')
    metadata = dict(metadata or {})
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as error:
      raise TypeError(f'metadata: expected a JSON-serialisable dict ({error})') from error
    return metadata

  def _write(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
             metadata: dict[str, Any], kinds: tuple[str, ...]) -> None:
    """Writes one checkpoint as each of ``kinds``, in that order; orbax rotates after each."""
    self.acquire()
    if 'latest' in kinds and step in self.steps('latest'):
      raise CheckpointError(
          f'step: {self.directory / "latest" / str(step)} already exists; a checkpoint is never '
          'overwritten (delete it yourself if it should go)'
      )
    if 'best' in kinds and step in self.steps('best'):
      self._set_aside_with_warning(
          'best', step, f'a new best checkpoint of step {step} was written; this one was written '
          'earlier at the same step, by a run that was later resumed from an older checkpoint')
    model_state, optimizer_state = _pure_state(model), _pure_state(optimizer)
    checksums = {'model': _checksums(model_state), 'optimizer': _checksums(optimizer_state),
                 'metadata': _json_checksum(metadata)}
    args = ocp.args.Composite(
        model=ocp.args.StandardSave(model_state),
        optimizer=ocp.args.StandardSave(optimizer_state),
        metadata=ocp.args.JsonSave(metadata),
        checksums=ocp.args.JsonSave(checksums),
    )
    with _interrupts_held():
      for kind in kinds:
        try:
          self._manager(kind, create=True).save(step, args=args, force=True)
        except Exception as error:  # a full disk (tensorstore raises ValueError), a vanished directory
          # The half-written step stays under orbax's temporary name (orbax's threads may still be
          # writing there): it is ignored, and removed by the next writer's acquire().
          raise CheckpointError(
              f'checkpoint_dir: saving the {kind} checkpoint of step {step} to {self.directory} failed '
              f'({type(error).__name__}: {error}); the checkpoints saved before are untouched'
          ) from error
        self._owned[kind].add(step)

  def set_aside(self, which: Literal['latest', 'best'], step: int, reason: str) -> pathlib.Path:
    """Moves a checkpoint to ``set_aside/`` (nothing is deleted), e.g. one that failed to verify.

    Args:
      which: ``'latest'`` or ``'best'``.
      step: a step of a ``which`` checkpoint in the directory.
      reason: why, written beside it.

    Returns:
      Its new directory. ``<that>.reason.txt`` beside it says why.

    Raises:
      CheckpointError: the directory is in use by another writer, or the
        move failed (the underlying OSError is its ``__cause__``).
    """
    if which not in _KINDS:
      raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
    self.acquire()
    source = self.directory / which / str(step)
    if not source.is_dir():
      raise FileNotFoundError(f'step: there is no {which!r} checkpoint of step {step} in {self.directory}')
    target_dir = self.directory / 'set_aside'
    target = target_dir / f'{which}-{step}'
    suffix = 1
    while target.exists() or target.with_name(target.name + '.reason.txt').exists():
      suffix += 1
      target = target_dir / f'{which}-{step}-{suffix}'
    self._close_managers()
    try:
      with _interrupts_held():
        target_dir.mkdir(exist_ok=True)
        shutil.move(str(source), str(target))  # a rename: no space needed on the same disk
        self._owned[which].discard(step)
        target.with_name(target.name + '.reason.txt').write_text(reason + '\n')
    except OSError as error:
      raise CheckpointError(
          f'checkpoint_dir: cannot move {source} to {target} ({type(error).__name__}: {error})'
      ) from error
    return target

  def _set_aside_with_warning(self, which: str, step: int, reason: str) -> pathlib.Path:
    moved = self.set_aside(which, step, reason)
    warnings.warn(f'checkpoint_dir: set aside the {which} checkpoint of step {step}: {reason}. '
                  f'It was moved to {moved}', RuntimeWarning, stacklevel=3)
    return moved

  def set_aside_after(self, step: int, reason: str) -> list[pathlib.Path]:
    """Sets aside every latest and best checkpoint newer than ``step``, each with a RuntimeWarning.

    A run resumed from ``step`` (after falling back past newer checkpoints
    that failed to verify) will write those steps again, on a new timeline:
    the old timeline's checkpoints are kept in ``set_aside/``, out of its way.

    Args:
      step: the step the run resumes from.
      reason: why, written beside each one and in its warning.

    Returns:
      The new directories, oldest step first.
    """
    step = checks.check_int('step', step, minimum=0)
    moved = []
    for which in _KINDS:
      for newer in self.steps(which):
        if newer > step:
          moved.append(self._set_aside_with_warning(which, newer, reason))
    return moved

  # Restoring -------------------------------------------------------------------

  def restore(
      self,
      model: nnx.Module,
      optimizer: nnx.Optimizer | None = None,
      *,
      which: Literal['latest', 'best'] = 'latest',
      verify: Callable[[CheckpointInfo], Any] | None = None,
      warn: bool = True,
  ) -> CheckpointInfo:
    """Loads a checkpoint into ``model`` (and ``optimizer``), in place.

    The stored arrays are checked against ``model`` and ``optimizer`` first
    (every variable must exist in both with the same shape and dtype), and
    their checksums are verified before anything is loaded. For
    ``which='latest'``, checkpoints that cannot be read, fail their
    checksums or are refused by ``verify`` are skipped, newest first, each
    with a RuntimeWarning naming its step and the reason;
    ``CheckpointInfo.skipped`` lists them too.

    A checkpoint deleted while it is read (a writer rotating the directory)
    is not skipped as corrupt: the restore starts again from the newest
    complete checkpoint, a few times, then raises CheckpointError.

    Each array is restored onto the devices and sharding of the array it
    replaces (orbax restores to the target's sharding), whatever devices
    wrote it: a checkpoint written on 8 devices restores onto one device,
    and one written on one device restores onto a mesh once the model was
    placed there (``ft.DataParallel(...).place(model, optimizer)``; ``fit``
    with ``parallel=`` places before it resumes).

    Args:
      model: a model of the same architecture as the saved one.
      optimizer: if given, its state is restored too.
      which: ``'latest'`` or ``'best'``.
      verify: called with the :class:`CheckpointInfo` of a checkpoint that
        passed its checksums, before anything is loaded; if it raises
        ValueError, that checkpoint is skipped like a corrupt one, with the
        error's message as the reason (``fit`` checks the history there).
      warn: warn for each skipped checkpoint (False: only ``skipped`` says so).

    Returns:
      A :class:`CheckpointInfo` with the step, the metadata and what was skipped.

    Raises:
      FileNotFoundError: there is no such checkpoint in the directory.
      ValueError: the checkpoint does not fit ``model`` or ``optimizer`` (the
        message names the first mismatched variable), or no checkpoint of
        ``which`` can be read and verified (the message gives each reason).
      CheckpointError: the checkpoints kept being deleted while they were read.

    Example:
      >>> info = ft.Checkpoints('runs/cnn').restore(model, optimizer)  # doctest: +SKIP
    """
    if not isinstance(model, nnx.Module):
      raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f'optimizer: expected an nnx.Optimizer or None, got {type(optimizer).__name__}')
    if which not in _KINDS:
      raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
    if verify is not None and not callable(verify):
      raise TypeError(f'verify: expected a callable or None, got {type(verify).__name__}')
    if not self.directory.is_dir():
      raise FileNotFoundError(f'checkpoint directory: {self.directory} does not exist')
    targets = {'model': (model, _pure_state(model))}
    if optimizer is not None:
      targets['optimizer'] = (optimizer, _pure_state(optimizer))
    for _ in range(_READ_ATTEMPTS):
      try:
        with _interrupts_held():
          step, restored, skipped = self._newest_usable(which, targets, verify)
        break
      except _Vanished:
        self._close_managers()  # list the directory afresh
    else:
      raise CheckpointError(
          f'checkpoint directory: the checkpoints in {self.directory / which} were deleted while they '
          f'were read, {_READ_ATTEMPTS} times: a writer is rotating them faster than they can be read. '
          'Restore again, or from a copy of the directory, or with keep= larger in the writer'
      )
    for name, (node, _) in targets.items():
      state = nnx.state(node)
      nnx.replace_by_pure_dict(state, restored[name])
      nnx.update(node, state)
    if warn:
      for skipped_step, reason in skipped:
        warnings.warn(f'checkpoint_dir: skipped the {which} checkpoint of step {skipped_step}: {reason}. '
                      f'Restored step {step} instead', RuntimeWarning, stacklevel=2)
    return CheckpointInfo(step=step, path=self.directory / which / str(step),
                          metadata=dict(restored['metadata'] or {}), skipped=tuple(skipped))

  def _newest_usable(self, which: str, targets: Mapping[str, Any], verify: Any) -> tuple[int, dict[str, Any], list]:
    """The newest checkpoint that reads and verifies: (step, its arrays, what was skipped)."""
    steps = self.steps(which)
    if not steps:
      found = sorted(p.name for p in self.directory.iterdir())
      raise FileNotFoundError(
          f"checkpoint directory: no complete {which!r} checkpoint in {self.directory} "
          f'(it contains {found}); was it written by flaxtrain.Checkpoints or flaxtrain.fit?'
      )
    skipped: list[tuple[int, str]] = []
    errors: list[Exception] = []
    for step in reversed(steps if which == 'latest' else steps[-1:]):
      path = self.directory / which / str(step)
      try:
        restored = self._read(which, step, targets)
      except _Unusable as error:
        if self.steps(which) != steps:  # being rotated away as it was read, not corrupt: start again
          raise _Vanished(str(path)) from error
        skipped.append((step, str(error)))
        errors.append(error)
        continue
      if verify is not None:
        try:
          verify(CheckpointInfo(step=step, path=path, metadata=dict(restored['metadata'] or {})))
        except ValueError as error:  # refused by the caller, e.g. its history is cut short
          skipped.append((step, str(error)))
          errors.append(error)
          continue
      return step, restored, skipped
    reasons = '; '.join(f'step {step}: {reason}' for step, reason in skipped)
    raise ValueError(
        f'checkpoint directory: no {which!r} checkpoint in {self.directory} can be used ({reasons}). '
        'Move a corrupt step directory away to fall back to an older checkpoint, or start afresh '
        'in a new directory.'
    ) from errors[0]

  def _read(self, which: str, step: int, targets: Mapping[str, Any]) -> dict[str, Any]:
    """Reads and verifies one checkpoint; raises _Unusable if it is unreadable or corrupt, _Vanished if deleted."""
    manager = self._manager(which)
    path = self.directory / which / str(step)
    try:
      stored = manager.item_metadata(step)
      stored = {name: stored[name].tree for name in targets}  # None.tree: item missing
    except Exception as error:  # orbax and tensorstore raise many kinds
      raise _unreadable(path, error) from error
    for name, (_, target) in targets.items():
      _check_compatible(name, target, stored[name], path)
    names = list(targets)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          metadata=ocp.args.JsonRestore(), checksums=ocp.args.JsonRestore(),
          **{name: ocp.args.StandardRestore(target) for name, (_, target) in targets.items()},
      ))
      restored = {name: restored[name] for name in ('metadata', 'checksums', *names)}
    except Exception as error:
      raise _unreadable(path, error) from error
    _verify(path, restored, names)
    return restored

  # Closing ---------------------------------------------------------------------

  def _close_managers(self) -> None:
    managers, self._managers = list(self._managers.values()), {}
    with _interrupts_held():
      for manager in managers:
        manager.close()

  def close(self) -> None:
    """Releases orbax's resources and the writer lock; the lock is released even if the rest fails."""
    try:
      self._close_managers()
    finally:
      self._lock.release()

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def restore_checkpoint(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    which: Literal['latest', 'best'] = 'latest',
) -> CheckpointInfo:
  """Loads the latest or best checkpoint in ``directory`` into ``model``, in place.

  A shortcut for ``Checkpoints(directory).restore(model, optimizer, which=which)``;
  it only reads (no lock is taken, nothing is changed). A newer checkpoint
  that fails its checksums is skipped with a RuntimeWarning naming its step
  and the reason.

  Args:
    directory: a checkpoint directory written by :class:`Checkpoints` or
      :func:`flaxtrain.fit`.
    model: a model of the same architecture.
    optimizer: if given, its state is restored too.
    which: ``'latest'`` or ``'best'``.

  Returns:
    A :class:`CheckpointInfo`.

  Example:
    >>> model = ft.CNN(rngs=nnx.Rngs(0))                          # doctest: +SKIP
    >>> info = ft.restore_checkpoint(run_dir, model, which='best')  # doctest: +SKIP
  """
  with Checkpoints(directory) as checkpoints:
    info = checkpoints.restore(model, optimizer, which=which, warn=False)
  for step, reason in info.skipped:
    warnings.warn(f'checkpoint_dir: skipped the {which} checkpoint of step {step}: {reason}. '
                  f'Restored step {info.step} instead', RuntimeWarning, stacklevel=2)
  return info
