"""Input checks shared by flaxtrain modules.

Array checks look only at static information (shapes and dtypes), so they
work the same eagerly and while JAX traces a jitted function. Number checks
are for configuration passed on the host (batch sizes, rates, step counts).
Both fail before any device work starts, with a message that names the
argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np


def check_floating(name: str, x: Any) -> None:
  """Raises ValueError unless ``x`` has a floating-point dtype."""
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise ValueError(
        f'{name}: expected a floating-point array, got dtype {jnp.asarray(x).dtype}'
    )


def check_integer(name: str, x: Any) -> None:
  """Raises ValueError unless ``x`` has an integer dtype."""
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
    raise ValueError(
        f'{name}: expected an integer array, got dtype {jnp.asarray(x).dtype}'
    )


def check_shape(name: str, x: Any, expected: tuple[int, ...], hint: str = '') -> None:
  """Raises ValueError unless ``x.shape == expected``."""
  shape = tuple(jnp.shape(x))
  if shape != tuple(expected):
    suffix = f' ({hint})' if hint else ''
    raise ValueError(f'{name}: expected shape {tuple(expected)}{suffix}, got {shape}')


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
  """Returns ``value`` as an int; ValueError unless it is an integer >= ``minimum``.

  Python and NumPy integers pass; bools and floats such as ``2.0`` do not.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    expected = 'a positive int' if minimum == 1 else f'an int >= {minimum}'
    raise ValueError(f'{name}: expected {expected}, got {value!r}')
  return int(value)


def check_real(
    name: str,
    value: Any,
    *,
    expected: str = 'a finite number',
    valid: Callable[[float], bool] = lambda _: True,
) -> float:
  """Returns ``value`` as a float; ValueError unless it is a finite real number and ``valid``.

  Python numbers, NumPy scalars and 0-d arrays pass; bools, strings and NaN do
  not. ``expected`` describes the accepted values in the message.
  """
  dtype = getattr(value, 'dtype', None)
  is_number = isinstance(value, numbers.Real) or (
      dtype is not None and np.ndim(value) == 0
      and (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer))
  )
  if isinstance(value, bool) or not is_number:
    raise ValueError(f'{name}: expected {expected}, got {value!r}')
  result = float(value)
  if not math.isfinite(result) or not valid(result):
    raise ValueError(f'{name}: expected {expected}, got {value!r}')
  return result
