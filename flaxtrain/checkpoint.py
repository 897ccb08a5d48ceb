"""Checkpoints of a training run with orbax: the latest one and the best one.

A checkpoint holds everything a run needs to continue exactly where it
stopped: the model's whole state (parameters, BatchNorm statistics and the
Dropout RNG key and counter), the optimizer's state (its step count, moments
and, with ``optax.inject_hyperparams``, the learning rate), and a JSON
``metadata`` dict chosen by the caller (``fit`` stores the data position and
the history there). Arrays go through orbax and tensorstore, the metadata
through JSON: nothing is pickled.

A checkpoint directory looks like this::

    checkpoint_dir/
      latest/<step>/   model/  optimizer/  metadata/   # the newest checkpoint
      best/<step>/     ...                            # the best one so far

Writes are synchronous and atomic: orbax writes a step into
``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only once
every file is complete, and deletes the previous step only after that. A crash
mid-write leaves a temporary directory, which is ignored (and removed the
next time the directory is opened), never a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from flaxtrain import _checks

__all__ = ['CheckpointInfo', 'Checkpoints', 'restore_checkpoint']

_KINDS = ('latest', 'best')


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """What :meth:`Checkpoints.restore` read, besides the arrays it restored.

  Attributes:
    step: the step the checkpoint was saved at.
    path: its directory.
    metadata: the JSON ``metadata`` dict given to :meth:`Checkpoints.save`.
  """

  step: int
  path: pathlib.Path
  metadata: dict[str, Any]


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


class Checkpoints:
  """The latest and the best checkpoint of a run, in one directory.

  Args:
    directory: where the checkpoints live. It is created by the first
      :meth:`save`; restoring from a directory that does not exist raises
      FileNotFoundError.

  Example:
    >>> checkpoints = Checkpoints('/tmp/run')                         # doctest: +SKIP
    >>> checkpoints.save(100, model, optimizer, metadata={'epoch': 3}, best=True)  # doctest: +SKIP
    >>> info = checkpoints.restore(model, optimizer, which='best')    # doctest: +SKIP
    >>> info.step, info.metadata['epoch']                             # doctest: +SKIP
    (100, 3)
  """

  def __init__(self, directory: str | os.PathLike[str]):
    if not isinstance(directory, (str, os.PathLike)):
      raise TypeError(f'directory: expected a path, got {type(directory).__name__} {directory!r:.60}')
    self.directory = pathlib.Path(directory).expanduser().resolve()
    if self.directory.exists() and not self.directory.is_dir():
      raise NotADirectoryError(f'directory: expected a directory, got the file {self.directory}')
    self._managers: dict[str, ocp.CheckpointManager] = {}

  def _manager(self, kind: str, create: bool = False) -> ocp.CheckpointManager | None:
    """The orbax manager of ``kind``; None if its directory does not exist yet."""
    if kind not in self._managers:
      path = self.directory / kind
      if not (create or path.is_dir()):
        return None
      options = ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False,  # a save is complete when save() returns
          preservation_policy=ocp.checkpoint_managers.LatestN(1),
          cleanup_tmp_directories=True,  # remove what a crash mid-write left behind
          create=True,
      )
      handlers = {
          'model': ocp.StandardCheckpointHandler(),
          'optimizer': ocp.StandardCheckpointHandler(),
          'metadata': ocp.JsonCheckpointHandler(),
      }
      self._managers[kind] = ocp.CheckpointManager(path, options=options, item_handlers=handlers)
    return self._managers[kind]

  def step(self, which: Literal['latest', 'best'] = 'latest') -> int | None:
    """The step of the ``which`` checkpoint, or None if there is none."""
    if which not in _KINDS:
      raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
    manager = self._manager(which)
    return None if manager is None else manager.latest_step()

  def path(self, which: Literal['latest', 'best'] = 'latest') -> pathlib.Path | None:
    """The directory of the ``which`` checkpoint, or None if there is none."""
    step = self.step(which)
    return None if step is None else self.directory / which / str(step)

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

    Args:
      step: a step number larger than that of the latest checkpoint.
      model: its whole ``nnx.state`` is saved, RNG state included.
      optimizer: an ``nnx.Optimizer``; its whole state is saved.
      metadata: a JSON-serialisable dict, returned by :meth:`restore`.
      best: also write it as the best checkpoint.

    Returns:
      The directory of the latest checkpoint. It is complete on return.
    """
    step = _checks.check_int('step', step, minimum=0)
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f'optimizer: expected an nnx.Optimizer, got {type(optimizer).__name__}')
    args = ocp.args.Composite(
        model=ocp.args.StandardSave(_pure_state(model)),
        optimizer=ocp.args.StandardSave(_pure_state(optimizer)),
        metadata=ocp.args.JsonSave(dict(metadata or {})),
    )
    # The best copy is written first: if a crash comes between the two writes,
    # the resumed run repeats the step and rewrites the same best checkpoint.
    for kind in (('best', 'latest') if best else ('latest',)):
      manager = self._manager(kind, create=True)
      if step in manager.all_steps():  # only after such a crash
        manager.delete(step)
      manager.save(step, args=args, force=True)
    return self.directory / 'latest' / str(step)

  def restore(
      self,
      model: nnx.Module,
      optimizer: nnx.Optimizer | None = None,
      *,
      which: Literal['latest', 'best'] = 'latest',
  ) -> CheckpointInfo:
    """Loads a checkpoint into ``model`` (and ``optimizer``), in place.

    The stored arrays are checked against ``model`` and ``optimizer`` first:
    every variable must exist in both with the same shape and dtype.

    Args:
      model: a model of the same architecture as the saved one.
      optimizer: if given, its state is restored too.
      which: ``'latest'`` or ``'best'``.

    Returns:
      A :class:`CheckpointInfo` with the step and the metadata.

    Raises:
      FileNotFoundError: there is no such checkpoint in the directory.
      ValueError: the checkpoint does not fit ``model`` or ``optimizer`` (the
        message names the first mismatched variable), or it cannot be read.
    """
    if not isinstance(model, nnx.Module):
      raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f'optimizer: expected an nnx.Optimizer or None, got {type(optimizer).__name__}')
    if not self.directory.is_dir():
      raise FileNotFoundError(f'checkpoint directory: {self.directory} does not exist')
    step = self.step(which)
    if step is None:
      found = sorted(p.name for p in self.directory.iterdir())
      raise FileNotFoundError(
          f"checkpoint directory: no complete {which!r} checkpoint in {self.directory} "
          f'(it contains {found}); was it written by flaxtrain.Checkpoints or flaxtrain.fit?'
      )
    manager = self._manager(which)
    path = self.directory / which / str(step)
    targets = {'model': (model, _pure_state(model))}
    if optimizer is not None:
      targets['optimizer'] = (optimizer, _pure_state(optimizer))
    try:
      stored = manager.item_metadata(step)
      stored = {name: stored[name].tree for name in targets}  # None.tree: item missing
    except Exception as error:  # orbax and tensorstore raise many kinds
      raise self._unreadable(path, error) from error
    for name, (_, target) in targets.items():
      _check_compatible(name, target, stored[name], path)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          metadata=ocp.args.JsonRestore(),
          **{name: ocp.args.StandardRestore(target) for name, (_, target) in targets.items()},
      ))
    except Exception as error:
      raise self._unreadable(path, error) from error
    for name, (node, _) in targets.items():
      state = nnx.state(node)
      nnx.replace_by_pure_dict(state, restored[name])
      nnx.update(node, state)
    return CheckpointInfo(step=step, path=path, metadata=dict(restored['metadata'] or {}))

  @staticmethod
  def _unreadable(path: pathlib.Path, error: BaseException) -> ValueError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return ValueError(
        f'checkpoint directory: cannot read the checkpoint at {path} '
        f'({type(error).__name__}: {message:.300}). Its files are incomplete or corrupt; '
        f'delete that step directory to fall back to an older checkpoint, or start afresh.'
    )

  def close(self) -> None:
    """Waits for pending work and releases orbax's resources."""
    for manager in self._managers.values():
      manager.close()
    self._managers.clear()

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

  A shortcut for ``Checkpoints(directory).restore(model, optimizer, which=which)``.

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
