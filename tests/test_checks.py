"""The shared argument checks behind every 'name: expected ..., got ...' error."""

import jax.numpy as jnp
import numpy as np
import pytest

from flaxtrain import checks


@pytest.mark.parametrize('value', [3, np.int64(3), np.int32(3)])
def test_check_int_accepts_python_and_numpy_ints(value):
  assert checks.check_int('n', value) == 3
  assert type(checks.check_int('n', value)) is int


@pytest.mark.parametrize('value, minimum, match', [
    (0, 1, 'n: expected a positive int, got 0'),
    (True, 1, 'n: expected a positive int, got True'),
    (2.0, 1, 'n: expected a positive int, got 2.0'),
    (-1, 0, 'n: expected an int >= 0, got -1'),
    ('3', 0, "n: expected an int >= 0, got '3'"),
])
def test_check_int_rejects(value, minimum, match):
  with pytest.raises(ValueError, match=match):
    checks.check_int('n', value, minimum=minimum)


@pytest.mark.parametrize('value', [0.5, 1, np.float32(0.5), jnp.float32(0.5), np.array(0.5)])
def test_check_real_accepts_numbers_and_scalar_arrays(value):
  assert checks.check_real('x', value) == float(value)


@pytest.mark.parametrize('value', [float('nan'), float('inf'), True, '0.5', None, np.ones(2), 1j])
def test_check_real_rejects_non_finite_and_non_numbers(value):
  with pytest.raises(ValueError, match=r'x: expected a finite number, got'):
    checks.check_real('x', value)


def test_check_real_range_predicate_and_message():
  assert checks.check_real('p', 0.0, expected='a number in [0, 1)', valid=lambda v: 0 <= v < 1) == 0.0
  with pytest.raises(ValueError, match=r'p: expected a number in \[0, 1\), got 1.0'):
    checks.check_real('p', 1.0, expected='a number in [0, 1)', valid=lambda v: 0 <= v < 1)
