"""Optimizers: one builder for the optax chains the notebooks and ``fit()`` use.

:func:`make_optimizer` returns a plain ``optax.GradientTransformation``,
built from optax pieces in a fixed order::

    apply_if_finite(                      # only with skip_nonfinite=n
        chain(
            clip_by_global_norm(clip_norm),   # only with clip_norm
            inject_hyperparams(core)(learning_rate=..., ...),
        ),
        max_consecutive_errors=n,
    )

The core transformation ('sgd', 'adam' or 'adamw') is wrapped in
``optax.inject_hyperparams``, so the optimizer state holds the learning rate
that each update used: :func:`flaxtrain.current_learning_rate` reads it and
the train step logs it as ``learning_rate``, with a schedule as well as with
a constant. Every argument is checked before anything touches a device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from flaxtrain import checks

__all__ = ['make_optimizer']

_NAMES = ('sgd', 'adam', 'adamw')


def _check_positive(name: str, value: Any) -> None:
  checks.check_real(name, value, expected='a finite number > 0', valid=lambda v: v > 0)


def _check_unit_interval(name: str, value: Any) -> None:
  checks.check_real(name, value, expected='a number in [0, 1)', valid=lambda v: 0.0 <= v < 1.0)


def _check_schedule(schedule: Callable[[jax.Array], jax.Array]) -> None:
  """Evaluates a learning-rate schedule at step 0 on the host: it must give a finite scalar >= 0.

  A NaN rate would otherwise reach the parameters on the first update, with
  every loss and gradient still finite.
  """
  try:
    value = np.asarray(schedule(np.int32(0)))
  except Exception as error:  # a schedule is arbitrary user code
    raise ValueError(f'learning_rate: calling the schedule at step 0 failed ({type(error).__name__}: {error})') from error
  if value.shape != () or not np.issubdtype(value.dtype, np.number):
    raise ValueError(f'learning_rate: expected the schedule to return a scalar rate, got {value.dtype} shape {value.shape} at step 0')
  if not np.isfinite(value) or value < 0:
    raise ValueError(f'learning_rate: expected the schedule to give a finite rate >= 0, got {value} at step 0')


def _check_arguments(
    name: Any,
    learning_rate: Any,
    weight_decay: Any,
    momentum: Any,
    b1: Any,
    b2: Any,
    eps: Any,
    clip_norm: Any,
    skip_nonfinite: Any,
) -> None:
  """Raises ValueError, naming the argument, for anything make_optimizer rejects."""
  if name not in _NAMES:
    raise ValueError(f'name: expected one of {list(_NAMES)}, got {name!r}')
  if not callable(learning_rate):
    checks.check_real(
        'learning_rate', learning_rate,
        expected='a finite number > 0 or an optax schedule (step -> rate)', valid=lambda v: v > 0,
    )
  else:
    _check_schedule(learning_rate)
  checks.check_real('weight_decay', weight_decay, expected='a finite number >= 0', valid=lambda v: v >= 0)
  if name == 'adam' and weight_decay > 0:
    raise ValueError(
        f"weight_decay: 'adam' takes no weight decay, got {weight_decay!r}. Adding it to "
        "Adam's gradient (an L2 term) lets the adaptive scaling shrink the decay of "
        "weights with large gradients; use 'adamw' for decay decoupled from the "
        'gradient (notebook 03 compares the two)'
    )
  if momentum is not None:
    if name != 'sgd':
      raise ValueError(
          f"momentum: applies to 'sgd' only, got momentum={momentum!r} for {name!r} "
          "(Adam's momentum is b1)"
      )
    _check_unit_interval('momentum', momentum)
  for arg, value in (('b1', b1), ('b2', b2), ('eps', eps)):
    if value is None:
      continue
    if name == 'sgd':
      raise ValueError(f"{arg}: applies to 'adam' and 'adamw' only, got {arg}={value!r} for 'sgd'")
    if arg == 'eps':
      _check_positive('eps', value)
    else:
      _check_unit_interval(arg, value)
  if clip_norm is not None:
    _check_positive('clip_norm', clip_norm)
  if skip_nonfinite is not None and (
      isinstance(skip_nonfinite, bool) or not isinstance(skip_nonfinite, int) or skip_nonfinite <= 0
  ):
    raise ValueError(
        f'skip_nonfinite: expected None or a positive int (the most consecutive '
        f'non-finite updates to skip), got {skip_nonfinite!r}'
    )


def _sgd_with_weight_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    momentum: float | None = None,
) -> optax.GradientTransformation:
  """SGD on ``grad + weight_decay * param``: for SGD, the same as an L2 term."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum),
  )


def make_optimizer(
    name: str,
    learning_rate: float | Callable[[jax.Array], jax.Array],
    *,
    weight_decay: float = 0.0,
    momentum: float | None = None,
    b1: float | None = None,
    b2: float | None = None,
    eps: float | None = None,
    clip_norm: float | None = None,
    skip_nonfinite: int | None = None,
) -> optax.GradientTransformation:
  """Builds an optax optimizer whose learning rate can be read from its state.

  ============  =========================================================
  ``name``      core transformation
  ============  =========================================================
  ``'sgd'``     ``optax.sgd(learning_rate, momentum)``; with
                ``weight_decay``, ``optax.add_decayed_weights`` first
                (for SGD that is exactly an L2 term of
                ``weight_decay / 2 * sum(w ** 2)`` in the loss)
  ``'adam'``    ``optax.adam(learning_rate, b1, b2, eps)``
  ``'adamw'``   ``optax.adamw(learning_rate, b1, b2, eps, weight_decay)``:
                decoupled decay, ``w -= learning_rate * weight_decay * w``
                beside the Adam step; every parameter is decayed
  ============  =========================================================

  Args:
    name: ``'sgd'``, ``'adam'`` or ``'adamw'``.
    learning_rate: a number > 0, or an optax schedule ``step -> rate``
      (evaluated once at step 0 here: it must give a finite rate >= 0).
    weight_decay: >= 0. For ``'sgd'`` and ``'adamw'``; ``'adam'`` refuses it
      (use ``'adamw'``).
    momentum: ``'sgd'`` only: the momentum decay in [0, 1); None is plain SGD.
    b1, b2, eps: ``'adam'`` and ``'adamw'`` only; None keeps optax's
      defaults (0.9, 0.999, 1e-8). ``b1`` is the decay of the running mean of
      gradients, ``b2`` of the running mean of their squares, ``eps`` keeps
      the division finite.
    clip_norm: if set (> 0), gradients whose global norm exceeds it are
      rescaled to that norm (``optax.clip_by_global_norm``) before the core.
    skip_nonfinite: if set to ``n`` (> 0), an update whose gradients hold a
      NaN or an infinity is skipped (parameters and moments unchanged), up to
      ``n`` times in a row; the ``n + 1``-th is applied
      (``optax.apply_if_finite``).

  Returns:
    An ``optax.GradientTransformation``. Wrap it for a model with
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

  Raises:
    ValueError: naming the argument, for an unknown ``name`` (the message
      lists the known ones), a learning rate <= 0, ``weight_decay < 0``,
      ``weight_decay`` with ``'adam'``, ``clip_norm <= 0``, ``momentum`` or
      ``b1``/``b2`` outside [0, 1), ``eps <= 0``, an argument given to an
      optimizer that does not use it, or ``skip_nonfinite`` not a positive int.

  Example:
    >>> tx = make_optimizer('adamw', 1e-3, weight_decay=1e-4, clip_norm=1.0)
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))               # doctest: +SKIP
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)       # doctest: +SKIP
    >>> flaxtrain.current_learning_rate(optimizer)                # doctest: +SKIP
    Array(0.001, dtype=float32)
  """
  _check_arguments(name, learning_rate, weight_decay, momentum, b1, b2, eps, clip_norm, skip_nonfinite)
  adam_kwargs = {k: v for k, v in (('b1', b1), ('b2', b2), ('eps', eps)) if v is not None}
  if name == 'sgd' and weight_decay > 0:
    core = optax.inject_hyperparams(_sgd_with_weight_decay)(
        learning_rate=learning_rate, weight_decay=weight_decay, momentum=momentum
    )
  elif name == 'sgd':
    core = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=momentum)
  elif name == 'adam':
    core = optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, **adam_kwargs)
  else:
    core = optax.inject_hyperparams(optax.adamw)(
        learning_rate=learning_rate, weight_decay=weight_decay, **adam_kwargs
    )
  tx = core if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), core)
  if skip_nonfinite is not None:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=skip_nonfinite)
  return tx
