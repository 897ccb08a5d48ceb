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
      set_aside/       latest-<step>/                 # fit(): checkpoints that failed to verify

Nothing is trusted or lost silently:

* **Checksums.** Every saved array (and the metadata) has a SHA-256 checksum
  recorded at save time and verified on restore; a mismatch names the array.
* **Several latest checkpoints.** The last ``keep`` are kept; restoring the
  latest tries them newest first and reports the ones it skipped, and why.
* **One writer.** Saving takes an OS-level lock (``fcntl.flock``) on
  ``.lock`` and holds it until :meth:`Checkpoints.close`; the OS releases it
  when the process dies, even by ``kill -9``. A second writer fails at once.
* **Only its own checkpoints are deleted.** A :class:`Checkpoints` deletes
  (when rotating) only checkpoints it wrote or was told to :meth:`adopt`.
* **Atomic writes.** orbax writes a step into ``<step>.orbax-checkpoint-tmp-*``
  and renames it to ``<step>`` only once every file is complete. A crash
  mid-write leaves a temporary directory, which is ignored, and removed by the
  next writer.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flaxtrain import _checks

__all__ = ['CheckpointError', 'CheckpointInfo', 'Checkpoints', 'restore_checkpoint']

_KINDS = ('latest', 'best')
_LOCK = '.lock'


class CheckpointError(RuntimeError):
  """A checkpoint directory cannot be written: it is in use, read-only, or a save failed.

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
      verify and was skipped.
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


def _pure_state(node: nnx.Module | nnx.Optimizer) -> dict[str, Any]:
  """The whole state of a model or optimizer as nested dicts of arrays."""
  return nnx.to_pure_dict(nnx.state(node))


def _key(path: tuple[Any, ...]) -> str:
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)


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


def _unreadable(path: pathlib.Path, error: BaseException) -> _Unusable:
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


class _Lock:
  """An exclusive ``fcntl.flock`` on a file; the OS releases it when the process dies."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.file = None

  def acquire(self) -> None:
    if self.file is not None:
      return
    file = open(self.path, 'a+')  # pylint: disable=consider-using-with  # held until release()
    try:
      fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      file.seek(0)
      holder = file.read().strip() or 'another process'
      file.close()
      if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise CheckpointError(
          f'checkpoint_dir: {self.path.parent} is in use by another writer ({holder}). Only one '
          'run may write a checkpoint directory at a time: wait for it to finish (or stop it), '
          'or pass another checkpoint_dir'
      ) from error
    file.seek(0)
    file.truncate()
    now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
    file.write(f'process {os.getpid()} on {socket.gethostname()}, since {now}\n')
    file.flush()
    self.file = file

  def release(self) -> None:
    if self.file is not None:
      self.file.close()  # closing the file releases the lock
      self.file = None


class Checkpoints:
  """The last ``keep`` checkpoints and the best one of a run, in one directory.

  Reading (:meth:`step`, :meth:`restore`) needs no lock and changes nothing.
  The first :meth:`save` (or :meth:`acquire`) takes the directory's writer
  lock, which is held until :meth:`close`.

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
    self.keep = _checks.check_int('keep', keep)
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
        this one) holds the lock, or the directory cannot be written; the
        underlying OSError is its ``__cause__``.
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
    self._close_managers()  # reopen them as a writer: that also removes what a crash left behind

  def adopt(self) -> None:
    """Lets this writer delete (when rotating) the checkpoints already in the directory.

    :func:`flaxtrain.fit` calls it when it resumes a run, which makes the
    resumed run's checkpoints its own.
    """
    for kind in _KINDS:
      manager = self._manager(kind)
      if manager is not None:
        self._owned[kind].update(manager.all_steps())

  # Reading ---------------------------------------------------------------------

  def _manager(self, kind: str, create: bool = False) -> ocp.CheckpointManager | None:
    """The orbax manager of ``kind``; None if its directory does not exist yet."""
    if kind not in self._managers:
      path = self.directory / kind
      if not (create or path.is_dir()):
        return None
      writer = self.writing
      options = ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False,  # a save is complete when save() returns
          max_to_keep=None,  # rotation is done by save(), which deletes only its own
          cleanup_tmp_directories=writer,  # only the lock holder may touch temporary dirs
          create=writer,
          read_only=not writer,
      )
      handlers = {
          'model': ocp.StandardCheckpointHandler(),
          'optimizer': ocp.StandardCheckpointHandler(),
          'metadata': ocp.JsonCheckpointHandler(),
          'checksums': ocp.JsonCheckpointHandler(),
      }
      self._managers[kind] = ocp.CheckpointManager(path, options=options, item_handlers=handlers)
    return self._managers[kind]

  def steps(self, which: Literal['latest', 'best'] = 'latest') -> list[int]:
    """The steps of the complete ``which`` checkpoints in the directory, oldest first."""
    if which not in _KINDS:
      raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
    manager = self._manager(which)
    if manager is None:
      return []
    manager.reload()
    return sorted(manager.all_steps())

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
    Once both are complete, latest checkpoints beyond the last ``keep`` and
    the previous best are deleted, if this object wrote (or adopted) them.

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
        written, or ``step`` is already there (nothing is overwritten).
    """
    step = _checks.check_int('step', step, minimum=0)
    if not isinstance(model, nnx.Module):
      raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f'optimizer: expected an nnx.Optimizer, got {type(optimizer).__name__}')
    metadata = dict(metadata or {})
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as error:
      raise TypeError(f'metadata: expected a JSON-serialisable dict ({error})') from error
    self._write(step, model, optimizer, metadata, ('latest', 'best') if best else ('latest',))
    return self.directory / 'latest' / str(step)

  def _write(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
             metadata: dict[str, Any], kinds: tuple[str, ...]) -> None:
    """Writes one checkpoint as each of ``kinds``, in that order, then rotates."""
    self.acquire()
    for kind in kinds:
      if step in self.steps(kind):
        raise CheckpointError(
            f'step: {self.directory / kind / str(step)} already exists; a checkpoint is never '
            'overwritten (delete it yourself if it should go)'
        )
    model_state, optimizer_state = _pure_state(model), _pure_state(optimizer)
    checksums = {'model': _checksums(model_state), 'optimizer': _checksums(optimizer_state),
                 'metadata': _json_checksum(metadata)}
    args = ocp.args.Composite(
        model=ocp.args.StandardSave(model_state),
        optimizer=ocp.args.StandardSave(optimizer_state),
        metadata=ocp.args.JsonSave(metadata),
        checksums=ocp.args.JsonSave(checksums),
    )
    for kind in kinds:
      self._manager(kind, create=True).save(step, args=args, force=True)
      self._owned[kind].add(step)
    if 'latest' in kinds:
      self._rotate('latest', self.keep)
    if 'best' in kinds:
      self._rotate('best', 1)

  def _rotate(self, kind: str, keep: int) -> None:
    """Deletes the oldest of this object's own ``kind`` checkpoints beyond the newest ``keep``."""
    manager = self._managers[kind]
    steps = sorted(manager.all_steps())
    for step in steps[:max(len(steps) - keep, 0)]:
      if step in self._owned[kind]:
        manager.delete(step)
        self._owned[kind].discard(step)

  def set_aside(self, which: Literal['latest', 'best'], step: int, reason: str) -> pathlib.Path:
    """Moves a checkpoint that failed to verify to ``set_aside/`` (nothing is deleted).

    Returns:
      Its new directory. ``<that>.reason.txt`` beside it says why.
    """
    self.acquire()
    target_dir = self.directory / 'set_aside'
    target_dir.mkdir(exist_ok=True)
    target = target_dir / f'{which}-{step}'
    suffix = 1
    while target.exists():
      suffix += 1
      target = target_dir / f'{which}-{step}-{suffix}'
    self._close_managers()
    shutil.move(str(self.directory / which / str(step)), str(target))
    target.with_name(target.name + '.reason.txt').write_text(reason + '\n')
    return target

  # Restoring -------------------------------------------------------------------

  def restore(
      self,
      model: nnx.Module,
      optimizer: nnx.Optimizer | None = None,
      *,
      which: Literal['latest', 'best'] = 'latest',
  ) -> CheckpointInfo:
    """Loads a checkpoint into ``model`` (and ``optimizer``), in place.

    The stored arrays are checked against ``model`` and ``optimizer`` first
    (every variable must exist in both with the same shape and dtype), and
    their checksums are verified before anything is loaded. For
    ``which='latest'``, checkpoints that cannot be read or fail their
    checksums are skipped, newest first; ``CheckpointInfo.skipped`` says
    which and why.

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

    Returns:
      A :class:`CheckpointInfo` with the step, the metadata and what was skipped.

    Raises:
      FileNotFoundError: there is no such checkpoint in the directory.
      ValueError: the checkpoint does not fit ``model`` or ``optimizer`` (the
        message names the first mismatched variable), or no checkpoint of
        ``which`` can be read and verified (the message gives each reason).
    """
    if not isinstance(model, nnx.Module):
      raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f'optimizer: expected an nnx.Optimizer or None, got {type(optimizer).__name__}')
    if which not in _KINDS:
      raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
    if not self.directory.is_dir():
      raise FileNotFoundError(f'checkpoint directory: {self.directory} does not exist')
    steps = self.steps(which)
    if not steps:
      found = sorted(p.name for p in self.directory.iterdir())
      raise FileNotFoundError(
          f"checkpoint directory: no complete {which!r} checkpoint in {self.directory} "
          f'(it contains {found}); was it written by flaxtrain.Checkpoints or flaxtrain.fit?'
      )
    targets = {'model': (model, _pure_state(model))}
    if optimizer is not None:
      targets['optimizer'] = (optimizer, _pure_state(optimizer))
    skipped: list[tuple[int, str]] = []
    errors: list[_Unusable] = []
    for step in reversed(steps if which == 'latest' else steps[-1:]):
      try:
        restored = self._read(which, step, targets)
      except _Unusable as error:
        skipped.append((step, str(error)))
        errors.append(error)
        continue
      for name, (node, _) in targets.items():
        state = nnx.state(node)
        nnx.replace_by_pure_dict(state, restored[name])
        nnx.update(node, state)
      path = self.directory / which / str(step)
      return CheckpointInfo(step=step, path=path, metadata=dict(restored['metadata'] or {}),
                            skipped=tuple(skipped))
    reasons = '; '.join(f'step {step}: {reason}' for step, reason in skipped)
    raise ValueError(
        f'checkpoint directory: no {which!r} checkpoint in {self.directory} can be used ({reasons}). '
        'Move a corrupt step directory away to fall back to an older checkpoint, or start afresh '
        'in a new directory.'
    ) from errors[0]

  def _read(self, which: str, step: int, targets: Mapping[str, Any]) -> dict[str, Any]:
    """Reads and verifies one checkpoint; raises _Unusable if it is unreadable or corrupt."""
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
    for manager in self._managers.values():
      manager.close()
    self._managers.clear()

  def close(self) -> None:
    """Releases orbax's resources and the writer lock."""
    self._close_managers()
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
  it only reads (no lock is taken, nothing is changed).

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
    return checkpoints.restore(model, optimizer, which=which)
