"""Metrics history recorded on the host without a device sync per step.

``record_step`` keeps references to the device arrays a step returned; they
come back to the host in a single ``jax.device_get`` when the history is
flushed (every ``flush_every`` steps, or when you read it). A training loop
that calls ``float(loss)`` every step waits for the device each time instead
and loses the overlap of Python and device work that asynchronous dispatch
gives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from flaxtrain import _checks

__all__ = ['History']


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
    _checks.check_int('flush_every', flush_every)
    self.flush_every = flush_every
    self._pending: list[tuple[int, Mapping[str, Any]]] = []
    self._step_rows: list[dict[str, float]] = []
    self._epoch_rows: list[dict[str, float]] = []

  def record_step(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records ``metrics`` (device arrays are fine) for ``step``; no sync."""
    if not isinstance(metrics, Mapping):
      raise TypeError(f'metrics: expected a dict of scalars, got {type(metrics).__name__}')
    self._pending.append((int(step), dict(metrics)))
    if len(self._pending) >= self.flush_every:
      self.flush()

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

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any], flush_every: int = 100) -> 'History':
    """Rebuilds a History from :meth:`state_dict` output."""
    if not isinstance(state, Mapping) or set(state) != {'steps', 'epochs'}:
      raise ValueError(f"state: expected a dict with keys 'steps' and 'epochs', got {state!r:.80}")
    history = cls(flush_every)
    history._step_rows = [{k: float(v) for k, v in r.items()} for r in state['steps']]
    history._epoch_rows = [{k: float(v) for k, v in r.items()} for r in state['epochs']]
    return history
