"""Exercises for the notebooks, each checked with one call.

Every notebook from 01 on ends with a few short exercises. Write the function
the exercise asks for, then check it::

  ft.exercises.check('04.1', warmup_stable_decay)

``check`` runs your function on a few inputs, compares the results with the
model answer's, and prints either a short confirmation or a hint that says
which value differs, at which input, and what the usual cause is.
``ft.exercises.solution('04.1')`` prints the model answer, and
``ft.exercises.ids()`` lists every exercise.
"""

from __future__ import annotations

import inspect
from typing import Any

from flaxtrain.exercises import _nb01, _nb02, _nb03, _nb04, _nb05, _nb06  # noqa: F401  (they register)
from flaxtrain.exercises import _nb07, _nb08, _nb09, _nb10, _nb11, _nb12, _nb13  # noqa: F401
from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import REGISTRY
from flaxtrain.exercises._core import Result
from flaxtrain.exercises._core import run

__all__ = ['Result', 'check', 'ids', 'solution', 'solutions']


def _spec(exercise_id: Any):
  if not isinstance(exercise_id, str) or exercise_id not in REGISTRY:
    raise ValueError(f'exercise_id: expected one of {", ".join(sorted(REGISTRY))}, got {exercise_id!r}')
  return REGISTRY[exercise_id]


def ids() -> dict[str, str]:
  """Every exercise, as {id: what it asks for}.

  Returns:
    A dict from exercise id (``'NN.k'``: notebook NN, exercise k) to its title.

  Example:
    >>> ft.exercises.ids()['04.1']
    'warmup, hold, linear decay, joined with optax.join_schedules'
  """
  return {key: REGISTRY[key].title for key in sorted(REGISTRY)}


def check(exercise_id: str, answer: Any, *, quiet: bool = False) -> Result:
  """Checks ``answer`` against exercise ``exercise_id`` and prints what it found.

  Errors raised by ``answer`` are reported as a hint, not raised: a stub that
  still raises ``NotImplementedError`` (or returns ``None``) is "not attempted
  yet".

  Args:
    exercise_id: which exercise, e.g. ``'04.1'`` (see :func:`ids`).
    answer: your function (each exercise says which signature).
    quiet: if True, print nothing (the message is in the result).

  Returns:
    A :class:`Result` with ``passed`` (bool), ``attempted`` and ``message``.

  Raises:
    ValueError: ``exercise_id`` is not an exercise.
    TypeError: ``answer`` is not callable.

  Example:
    >>> def masked_mean(values, mask):
    ...   return jnp.sum(values * mask) / jnp.sum(mask)
    >>> ft.exercises.check('01.1', masked_mean).passed
    01.1 passed: padded entries are ignored and the mean divides by the number of real examples.
    True
  """
  spec = _spec(exercise_id)
  if not callable(answer):
    raise TypeError(f'answer: exercise {exercise_id} expects {spec.expects}; got {type(answer).__name__} '
                    f'{answer!r:.60}. Pass the function itself, without calling it')
  result = run(exercise_id, answer)
  if not quiet:
    print(result.message)
  return result


def solution(exercise_id: str) -> None:
  """Prints the model answer of exercise ``exercise_id`` (its source code).

  Args:
    exercise_id: which exercise, e.g. ``'04.1'``.

  Returns:
    None; the source is printed.

  Example:
    >>> ft.exercises.solution('01.1')  # prints def masked_mean(values, mask): ...
  """
  spec = _spec(exercise_id)
  print(f'# Model answer to exercise {spec.id}: {spec.title}')
  print(inspect.getsource(spec.solution).rstrip())
