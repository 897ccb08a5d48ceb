"""The machinery behind ``ft.exercises.check``: a registry and comparison helpers.

Each notebook module (``_nb01.py`` ...) registers its exercises with
:func:`exercise`. A check function receives the learner's answer, calls it
through :func:`call` and compares what comes back with the reference through
:func:`compare`. Anything that goes wrong is raised as :class:`Fail` (a hint
for the learner), :class:`NotAttempted` (the starting stub) or
:class:`LearnerError` (the learner's code raised); :func:`run` turns each into
a short message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ['Exercise', 'Fail', 'LearnerError', 'NotAttempted', 'Result', 'REGISTRY', 'call', 'compare', 'exercise',
           'fmt', 'run']


class Fail(Exception):
  """The answer ran but gave a wrong result; the message is the hint."""


class NotAttempted(Exception):
  """The answer is still the starting stub."""


class LearnerError(Exception):
  """The learner's code raised ``error``."""

  def __init__(self, error: BaseException):
    super().__init__(f'{type(error).__name__}: {error}')
    self.error = error


@dataclasses.dataclass(frozen=True)
class Exercise:
  """One exercise: its id, a title, what the answer must be, its check and its model answer."""
  id: str
  title: str
  expects: str
  check: Callable[[Any], str]
  solution: Callable[..., Any]
  on_error: Callable[[BaseException], str | None] = lambda error: None


REGISTRY: dict[str, Exercise] = {}


def exercise(id: str, title: str, expects: str, solution: Callable[..., Any],
             on_error: Callable[[BaseException], str | None] | None = None) -> Callable[[Callable[[Any], str]], Callable[[Any], str]]:
  """Registers the decorated check function as exercise ``id``."""
  def register(check: Callable[[Any], str]) -> Callable[[Any], str]:
    if id in REGISTRY:
      raise ValueError(f'exercise {id!r} is registered twice')
    REGISTRY[id] = Exercise(id, title, expects, check, solution, on_error or (lambda error: None))
    return check
  return register


@dataclasses.dataclass(frozen=True)
class Result:
  """What ``ft.exercises.check`` found.

  Attributes:
    exercise: the exercise id, e.g. ``'04.1'``.
    passed: True if the answer matched the reference on every input.
    attempted: False while the answer is still the starting stub.
    message: the confirmation or the hint that was printed.
  """
  exercise: str
  passed: bool
  attempted: bool
  message: str

  def __bool__(self) -> bool:
    return self.passed

  def _ipython_display_(self) -> None:
    """Shows nothing: ``check`` has already printed the message."""


def call(answer: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """Calls the learner's ``answer``, turning its exceptions into NotAttempted or LearnerError."""
  try:
    result = answer(*args, **kwargs)
  except NotImplementedError as error:
    raise NotAttempted() from error
  except Exception as error:  # the learner's code: report it, don't show a traceback
    raise LearnerError(error) from error
  if result is None or result is Ellipsis:
    raise NotAttempted()
  return result


def fmt(x: Any) -> str:
  """A short, readable form of a number or small array for a hint."""
  array = np.asarray(x)
  if array.ndim == 0:
    value = array.item()
    if isinstance(value, (bool, np.bool_)):
      return str(bool(value))
    if isinstance(value, float):
      return f'{value:.6g}'
    return str(value)
  with np.printoptions(precision=5, suppress=False, threshold=20, edgeitems=3):
    return np.array2string(array, separator=', ')


def _as_array(value: Any, what: str) -> np.ndarray:
  try:
    return np.asarray(jax.device_get(value))
  except Exception as error:
    raise Fail(f'{what} should be an array, but it is a {type(value).__name__} that NumPy cannot convert '
               f'({type(error).__name__}: {error})') from error


def compare(got: Any, expected: Any, *, what: str, at: str = '', rtol: float = 1e-5, atol: float = 1e-7,
            mistakes: Sequence[tuple[Any, str]] = (), index_names: Sequence[str] = ()) -> None:
  """Raises Fail unless ``got`` is close to ``expected``.

  Args:
    got: the learner's value (a number or an array).
    expected: the reference value.
    what: how to name the value in a hint, e.g. 'your loss'.
    at: the input it was computed at, for the hint, e.g. 'at step 100'.
    rtol: relative tolerance.
    atol: absolute tolerance.
    mistakes: (wrong value, hint) pairs: if ``got`` matches one of the wrong
      values, that hint is given instead of the generic one.
    index_names: names of the axes, used when pointing at the first entry that
      differs (e.g. ('row', 'column')).

  Returns:
    None (raises Fail on a mismatch).
  """
  where = f' {at}' if at else ''
  expected = np.asarray(expected)
  got = _as_array(got, what)
  if got.shape != expected.shape:
    for wrong, hint in mistakes:
      wrong = np.asarray(wrong)
      if got.shape == wrong.shape and _close(got, wrong, rtol, atol):
        raise Fail(_place(at, hint))
    raise Fail(f'{what}{where} has shape {got.shape}, but it should have shape {expected.shape}')
  if _close(got, expected, rtol, atol):
    return
  for wrong, hint in mistakes:
    wrong = np.asarray(wrong)
    if got.shape == wrong.shape and _close(got, wrong, rtol, atol):
      raise Fail(_place(at, hint))
  if expected.ndim == 0:
    raise Fail(f'{what}{where} is {fmt(got)}, but it should be {fmt(expected)}')
  bad = ~_close_elementwise(got, expected, rtol, atol)
  index = tuple(int(i) for i in np.argwhere(bad)[0])
  if len(index_names) >= len(index):
    position = ', '.join(f'{name} {i}' for name, i in zip(index_names, index))
  else:
    position = f'index {list(index)}'
  raise Fail(f'{what}{where}: at {position} the value is {fmt(got[index])}, but it should be '
             f'{fmt(expected[index])} ({int(bad.sum())} of {bad.size} entries differ)')


def _place(at: str, text: str) -> str:
  return f'{at[0].upper()}{at[1:]}: {text}' if at else text


def _close_elementwise(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> np.ndarray:
  if a.dtype == np.bool_ or b.dtype == np.bool_:
    return a.astype(bool) == b.astype(bool)
  try:
    return np.isclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True)
  except (TypeError, ValueError):
    return a == b


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> bool:
  return bool(np.all(_close_elementwise(a, b, rtol, atol)))


def run(exercise_id: str, answer: Any) -> Result:
  """Runs the check of ``exercise_id`` on ``answer`` and returns the Result (printing nothing)."""
  spec = REGISTRY[exercise_id]
  name = getattr(answer, '__name__', 'your function')
  try:
    detail = spec.check(answer)
  except NotAttempted:
    message = (f'{spec.id} not attempted yet: replace the `...` in `{name}` with your code (and `return` the '
               'result), then run this cell again.')
    return Result(spec.id, False, False, message)
  except LearnerError as wrapped:
    error = wrapped.error
    text = str(error).strip().splitlines()
    first = text[0] if text else ''
    message = f'{spec.id} not passed: your code raised {type(error).__name__}: {first}'
    extra = spec.on_error(error)
    if extra:
      message += f'\nHint: {extra}'
    return Result(spec.id, False, True, message)
  except Fail as failure:
    return Result(spec.id, False, True, f'{spec.id} not passed: {failure}')
  except Exception as error:  # a result of an unexpected kind that the comparison could not use
    message = (f'{spec.id} not passed: the check could not use what your function returned '
               f'({type(error).__name__}: {error}); it expects {spec.expects}')
    return Result(spec.id, False, True, message)
  return Result(spec.id, True, True, f'{spec.id} passed: {detail}')
