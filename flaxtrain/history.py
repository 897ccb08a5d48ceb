"""Metrics history recorded on the host without a device sync per step.

``record_step`` keeps references to the device arrays a step returned; they
come back to the host in a single ``jax.device_get`` when the history is
flushed (every ``flush_every`` steps, or when you read it). A training loop
that calls ``float(loss)`` every step waits for the device each time instead
and loses the overlap of Python and device work that asynchronous dispatch
gives.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import pathlib
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain import checks

__all__ = ['History']  # HistoryLog and HistoryError are used by fit() and not exported


class HistoryError(ValueError):
  """A history file on disk is missing, cut short or corrupt: the checkpoint that refers to it cannot be resumed.

  An older checkpoint refers to a shorter prefix of the same files, which may
  still verify: :func:`flaxtrain.fit` falls back to it.
  """


def _check_metrics(name: str, metrics: Any, reserved: tuple[str, ...]) -> None:
  """Raises unless ``metrics`` is a dict of scalar numbers keyed by strings (no device sync)."""
  if not isinstance(metrics, Mapping):
    raise TypeError(f'{name}: expected a dict of scalars, got {type(metrics).__name__}')
  for key, value in metrics.items():
    if not isinstance(key, str) or key in reserved:
      raise ValueError(f'{name}: expected metric names that are strings other than {reserved}, got {key!r}')
    if type(value) is float:  # what fit records: checked at C speed, no ABC or dtype look-up
      continue
    dtype = getattr(value, 'dtype', None)
    if dtype is not None:
      ok = np.ndim(value) == 0 and (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))
    else:
      ok = isinstance(value, numbers.Real)
    if not ok:
      shown = f'shape {np.shape(value)}' if dtype is not None and np.ndim(value) else f'{value!r:.40}'
      raise ValueError(f'{name}: expected a scalar number for {key!r}, got {type(value).__name__} {shown}')


def _columns(rows: list[dict[str, float]], index: str) -> dict[str, np.ndarray]:
  """Rows of dicts -> dict of float arrays; NaN where a row lacks a key."""
  names = [index] + sorted({k for row in rows for k in row} - {index})
  return {name: np.array([row.get(name, math.nan) for row in rows], dtype=np.float64) for name in names}


class History:
  """Per-step and per-epoch metrics, exported as NumPy arrays.

  Steps are counted as optax counts them: the first update is step 0. A step
  metric recorded at step ``i`` was measured on the parameters after ``i``
  updates, and its ``learning_rate`` is ``schedule(i)``, so it lines up with
  :func:`flaxtrain.plot_schedule`. An epoch record's ``step`` is the number of
  updates done when it was measured.

  Conventions used by :func:`flaxtrain.plot_history`: step metrics are named
  plainly (``loss``, ``accuracy``, ``grad_norm``, ``learning_rate``); epoch
  metrics carry a ``train_`` or ``val_`` prefix.

  Example:
    >>> history = History()
    >>> history.record_step(1, {'loss': jnp.float32(2.0)})
    >>> history.record_epoch(0, {'val_loss': 1.5}, step=1)
    >>> history.steps()['loss']
    array([2.])
  """

  def __init__(self, flush_every: int = 100):
    checks.check_int('flush_every', flush_every)
    self.flush_every = flush_every
    self._pending: list[tuple[int, Mapping[str, Any]]] = []
    self._step_rows: list[dict[str, float]] = []
    self._epoch_rows: list[dict[str, float]] = []

  def record_step(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records ``metrics`` (device arrays are fine) for ``step``; no sync.

    Args:
      step: an int >= 0, larger than the previously recorded step.
      metrics: a dict of scalar numbers (Python, NumPy or JAX scalars); only
        their shapes and dtypes are checked here, so nothing waits for the device.

    Raises:
      ValueError: for a negative or non-increasing step, a metric that is not
        a scalar number, or a metric name that is not a string.
    """
    step = checks.check_int('step', step, minimum=0)
    last = self._last_step()
    if last is not None and step <= last:
      raise ValueError(f'step: expected a step after the last recorded one ({last}), got {step}')
    _check_metrics('metrics', metrics, reserved=('step',))
    self._pending.append((step, dict(metrics)))
    if len(self._pending) >= self.flush_every:
      self.flush()

  def extend_rows(self, steps: Sequence[int], rows: Sequence[dict[str, float]]) -> None:
    """Appends rows of Python floats already on the host, at increasing ``steps`` (for fit).

    ``fit`` brings a logging interval's metrics to the host itself, as Python
    floats under the step's own metric names, so the per-row checks and the
    device transfer of :meth:`record_step` would only repeat work: here only
    the order of the steps is checked, once per call.
    """
    if not steps:
      return
    self.flush()
    last = self._last_step()
    if (last is not None and steps[0] <= last) or any(b <= a for a, b in zip(steps, steps[1:])):
      raise ValueError(f'steps: expected increasing steps after the last recorded one ({last}), got {list(steps)[:8]}')
    self._step_rows.extend({'step': float(step), **row} for step, row in zip(steps, rows))

  def _last_step(self) -> int | None:
    if self._pending:
      return self._pending[-1][0]
    return int(self._step_rows[-1]['step']) if self._step_rows else None

  def flush(self) -> None:
    """Brings pending step metrics to the host in one transfer."""
    if not self._pending:
      return
    values = jax.device_get([metrics for _, metrics in self._pending])
    for (step, _), row in zip(self._pending, values):
      self._step_rows.append({'step': float(step), **{k: float(v) for k, v in row.items()}})
    self._pending.clear()

  def record_epoch(self, epoch: int, metrics: Mapping[str, Any], *, step: int) -> None:
    """Records end-of-epoch ``metrics`` (host or device scalars) at ``step``."""
    checks.check_int('epoch', epoch, minimum=0)
    checks.check_int('step', step, minimum=0)
    _check_metrics('metrics', metrics, reserved=('epoch', 'step'))
    values = jax.device_get(dict(metrics))
    self._epoch_rows.append(
        {'epoch': float(epoch), 'step': float(step), **{k: float(v) for k, v in values.items()}}
    )

  def steps(self) -> dict[str, np.ndarray]:
    """Step metrics as ``{'step': ..., name: ...}`` float arrays."""
    self.flush()
    return _columns(self._step_rows, 'step')

  def epochs(self) -> dict[str, np.ndarray]:
    """Epoch metrics as ``{'epoch': ..., 'step': ..., name: ...}`` float arrays."""
    return _columns(self._epoch_rows, 'epoch')

  def __len__(self) -> int:
    """Number of recorded steps (pending ones included)."""
    return len(self._step_rows) + len(self._pending)

  def state_dict(self) -> dict[str, list[dict[str, float]]]:
    """Plain lists of floats (JSON-safe), e.g. to store beside a checkpoint."""
    self.flush()
    return {'steps': [dict(r) for r in self._step_rows], 'epochs': [dict(r) for r in self._epoch_rows]}

  def rows_since(self, steps: int, epochs: int) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The step rows after the first ``steps`` and the epoch rows after the first ``epochs``.

    What :class:`HistoryLog` appends at each checkpoint: its cost grows with
    the rows recorded since the last one, not with the whole history.
    """
    self.flush()
    return self._step_rows[steps:], self._epoch_rows[epochs:]

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any], flush_every: int = 100) -> 'History':
    """Rebuilds a History from :meth:`state_dict` output."""
    if not isinstance(state, Mapping) or set(state) != {'steps', 'epochs'}:
      raise ValueError(f"state: expected a dict with keys 'steps' and 'epochs', got {state!r:.80}")
    history = cls(flush_every)
    history._step_rows = [{k: float(v) for k, v in r.items()} for r in state['steps']]
    history._epoch_rows = [{k: float(v) for k, v in r.items()} for r in state['epochs']]
    return history


class HistoryLog:
  """A :class:`History` kept on disk as append-only JSON-lines files.

  Each save appends only the rows recorded since the previous one, so its
  cost does not grow with the length of the run (rewriting the whole history
  as JSON at each checkpoint would). A checkpoint refers to the history by
  its *segments*: ``{'file', 'bytes', 'sha256'}`` for each file, the number
  of bytes that belong to it and their checksum. Files are never rewritten:
  a resumed run appends to a new file of its own, and bytes past a segment's
  end (written after the checkpoint that is resumed) are ignored.

  Args:
    directory: where the ``.jsonl`` files live.
    segments: the segments of the run being resumed (from :meth:`write`).
    history: the History those segments hold (from :meth:`read`); its rows
      are not written again.
  """

  def __init__(self, directory: str | os.PathLike[str], segments: Sequence[Mapping[str, Any]] = (),
               history: History | None = None):
    self.directory = pathlib.Path(directory)
    self.segments = [dict(segment) for segment in segments]
    self._written = (len(history._step_rows), len(history._epoch_rows)) if history is not None else (0, 0)
    self._file = None
    self._name = ''
    self._bytes = 0
    self._hash = hashlib.sha256()

  def write(self, history: History) -> list[dict[str, Any]]:
    """Appends the rows of ``history`` not yet written; returns the segments that hold it all.

    The file is written unbuffered and synced, so a failed write (a full
    disk) raises here and leaves nothing to be flushed later: :meth:`close`
    cannot fail with it again. After a failed write the file is given up at
    the last byte known to be good, and the next write starts a new file;
    the rows that failed are written again there.

    Raises:
      OSError: the rows could not be written (nothing after the last good
        byte is referred to by any segment).
    """
    steps, epochs = history.rows_since(*self._written)
    data = ''.join(json.dumps(['s', row]) + '\n' for row in steps)
    data += ''.join(json.dumps(['e', row]) + '\n' for row in epochs)
    if self._file is None:
      self.directory.mkdir(parents=True, exist_ok=True)
      self._name = f'{uuid.uuid4().hex}.jsonl'
      self._file = open(self.directory / self._name, 'xb', buffering=0)  # pylint: disable=consider-using-with
    if data:
      encoded = data.encode()
      try:
        view = memoryview(encoded)
        while view:  # an unbuffered write may write less than asked
          view = view[self._file.write(view):]
        os.fsync(self._file.fileno())
      except OSError:
        self._give_up_file()
        raise
      self._hash.update(encoded)
      self._bytes += len(encoded)
    self._written = (self._written[0] + len(steps), self._written[1] + len(epochs))
    return self.segments + [self._segment()]

  def _segment(self) -> dict[str, Any]:
    return {'file': self._name, 'bytes': self._bytes, 'sha256': self._hash.hexdigest()}

  def _give_up_file(self) -> None:
    """Closes the current file after a failed write; its good prefix stays a segment."""
    if self._bytes:
      self.segments.append(self._segment())
    file, self._file = self._file, None
    self._bytes, self._hash = 0, hashlib.sha256()
    try:
      file.close()  # unbuffered: nothing is flushed, so nothing can fail again
    except OSError:
      pass

  @staticmethod
  def read(directory: str | os.PathLike[str], segments: Sequence[Mapping[str, Any]]) -> History:
    """Rebuilds the History that ``segments`` describe, verifying each one's checksum.

    Raises:
      HistoryError: a file is missing, shorter than its segment, or its
        bytes do not match the recorded checksum (the message names the
        file). It is a ValueError.
    """
    steps, epochs = [], []
    for segment in segments:
      path = pathlib.Path(directory) / segment['file']
      try:
        with open(path, 'rb') as file:
          data = file.read(segment['bytes'])
      except OSError as error:
        raise HistoryError(f'history: cannot read {path} ({error})') from error
      if len(data) != segment['bytes'] or hashlib.sha256(data).hexdigest() != segment['sha256']:
        raise HistoryError(
            f'history: {path} does not hold the {segment["bytes"]} bytes recorded with the checkpoint '
            '(it is truncated or corrupt: its SHA-256 checksum differs)'
        )
      for line in data.decode().splitlines():
        kind, row = json.loads(line)
        (steps if kind == 's' else epochs).append(row)
    return History.from_state_dict({'steps': steps, 'epochs': epochs})

  def close(self) -> None:
    """Closes the current file. Never raises: a clean-up must not hide the error that stopped a run.

    Every write was already synced, so closing loses nothing; a failure to
    close is reported as a RuntimeWarning.
    """
    if self._file is not None:
      file, self._file = self._file, None
      try:
        file.close()
      except OSError as error:
        warnings.warn(f'history: closing {self.directory / self._name} failed ({error}); '
                      'every row written before was synced', RuntimeWarning, stacklevel=2)
