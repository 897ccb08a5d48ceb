"""Input checks shared by flaxtrain modules.

Every check runs on static information (shapes and dtypes), so it works the
same eagerly and while JAX traces a jitted function, and it fails before any
device work starts. Messages name the argument, what was expected and what
was given.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


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


def check_positive_int(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is an int greater than zero."""
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'{name}: expected a positive int, got {value!r}')
