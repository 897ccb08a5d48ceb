"""When two optimizers run the same program: the key a compiled step is cached under.

``optax.adam(1e-3)`` built twice gives two transformations whose functions
are different closure objects, so nothing about them compares equal, and a
step keyed by the transformation would compile again for every new
optimizer (0.4-1 s on a small model, each time a notebook cell builds one).
:func:`optimizer_key` describes what the optimizer's update computes instead,
in one of two ways:

* **its functions, read as data** (about 50 µs for ``optax.adam``): each
  function's code object, the values its closure cells hold, its default
  arguments and the module-level names its code reads, recursively through
  ``optax.chain``, schedules, ``functools.partial`` and bound methods. Two
  functions with equal keys run the same code on the same values, so they
  trace to the same program. Only values that can be compared by content
  are accepted (numbers, strings, arrays by their bytes, containers of
  those, classes, modules and functions); anything else, such as an
  instance of a user's class whose attributes might change between calls,
  makes the key fall back to
* **the jaxpr of ``tx.update``** on the model's parameter shapes (about
  1 ms): exact whatever the functions hold.

Both are computed afresh on every call (nothing is remembered between
calls), from public Python and JAX attributes only.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import types
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = ['function_key', 'optimizer_key']

_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.generic, np.dtype)
# Beyond these, a description costs more than the jaxpr it saves (hashing a large array a function happens
# to read, a container of a module's registry): fall back to the jaxpr.
_MAX_ARRAY_VALUES = 1 << 16
_MAX_VALUES_READ = 5000


class _NotComparable(Exception):
  """Raised inside :func:`function_key` for a value it cannot compare by content."""


class _Reading:
  """What one description has read so far: the functions being described, and how many values."""

  def __init__(self):
    self.functions: set[int] = set()
    self.values = 0


def _value_key(value: Any, seen: _Reading) -> Any:
  seen.values += 1
  if seen.values > _MAX_VALUES_READ:
    raise _NotComparable
  if isinstance(value, _PLAIN):
    return type(value), value
  if isinstance(value, type):
    return value
  if isinstance(value, types.ModuleType):
    return 'module', value.__name__
  if isinstance(value, jax.core.Tracer):
    raise _NotComparable
  if isinstance(value, (np.ndarray, jax.Array)):
    if np.size(value) > _MAX_ARRAY_VALUES:
      raise _NotComparable
    array = np.asarray(value)
    return 'array', array.dtype.str, array.shape, hashlib.sha1(array.tobytes()).hexdigest()
  if isinstance(value, (tuple, list)):  # NamedTuples too: their class is part of the key
    return type(value), tuple(_value_key(item, seen) for item in value)
  if isinstance(value, dict):
    return type(value), tuple((_value_key(k, seen), _value_key(v, seen)) for k, v in value.items())
  if isinstance(value, functools.partial):
    return 'partial', _value_key(value.func, seen), _value_key(value.args, seen), _value_key(value.keywords, seen)
  if isinstance(value, types.FunctionType):
    return _function_key(value, seen)
  if isinstance(value, types.MethodType):
    return 'method', _value_key(value.__func__, seen), _value_key(value.__self__, seen)
  module = sys.modules.get(getattr(value, '__module__', None) or '')
  name = getattr(value, '__name__', None)
  if (callable(value) and module is not None and module.__name__ != '__main__' and isinstance(name, str)
      and getattr(module, name, None) is value):
    # A library's own callable (a builtin, a ufunc, a jitted function of jax.numpy), by its name: a library
    # is not redefined while it runs. A notebook's (__main__) can be, so it is read through __wrapped__.
    return 'global', module.__name__, name
  wrapped = getattr(value, '__wrapped__', None)
  if isinstance(wrapped, types.FunctionType):  # jax.jit(f), functools.wraps: described by f
    return 'wrapped', type(value), _function_key(wrapped, seen)
  raise _NotComparable


def _names_read(code: types.CodeType) -> set[str]:
  """The global (and attribute) names a code object and the functions defined in it read."""
  names = set(code.co_names)
  for const in code.co_consts:
    if isinstance(const, types.CodeType):
      names |= _names_read(const)
  return names


def _function_key(function: types.FunctionType, seen: _Reading) -> Any:
  if id(function) in seen.functions:  # a function reached again through itself: its key is being built
    return 'again', function.__qualname__
  seen.functions.add(id(function))
  cells = []
  for cell in function.__closure__ or ():
    try:
      contents = cell.cell_contents
    except ValueError:  # a cell not yet filled
      cells.append('empty')
      continue
    cells.append(_value_key(contents, seen))
  names = sorted(name for name in _names_read(function.__code__) if name in function.__globals__)
  read = tuple((name, _value_key(function.__globals__[name], seen)) for name in names)
  return ('function', function.__code__, _value_key(function.__defaults__, seen),
          _value_key(function.__kwdefaults__, seen), tuple(cells), read)


def function_key(function: Any) -> Any:
  """A hashable description of what ``function`` computes, or None if it holds a value not comparable by content.

  Equal keys mean the same code run on the same values (closures, defaults,
  the module-level names it reads); different keys may still compute the
  same thing.

  Example:
    >>> function_key(optax.adam(1e-3).update) == function_key(optax.adam(1e-3).update)  # doctest: +SKIP
    True
    >>> function_key(optax.adam(1e-3).update) == function_key(optax.adam(1e-2).update)  # doctest: +SKIP
    False
  """
  try:
    return _value_key(function, _Reading())
  except (_NotComparable, RecursionError):  # RecursionError: a container that holds itself
    return None


def _jaxpr_key(jaxpr: Any) -> tuple[Any, ...]:
  """A jaxpr as nested tuples: its equations, their wiring, literals and parameters (nested jaxprs too).

  Faster than printing the jaxpr, and as exact: two jaxprs with the same key
  compute the same function.
  """
  numbers: dict[Any, Any] = {}

  def aval(v: Any) -> Any:
    return type(v.aval), getattr(v.aval, 'shape', None), getattr(v.aval, 'dtype', None)

  def var(v: Any) -> Any:
    if hasattr(v, 'val'):  # a literal
      return 'literal', np.asarray(v.val).tobytes(), aval(v)
    found = numbers.get(v)
    if found is None:
      found = numbers[v] = (len(numbers), aval(v))
    return found

  def param(value: Any) -> Any:
    if hasattr(value, 'jaxpr') and hasattr(value, 'consts'):  # a closed jaxpr
      return _jaxpr_key(value.jaxpr), _consts_key(value.consts)
    if hasattr(value, 'eqns'):
      return _jaxpr_key(value)
    if isinstance(value, (tuple, list)):
      return tuple(param(v) for v in value)
    return repr(value)

  eqns = tuple((eqn.primitive.name, tuple(map(var, eqn.invars)), tuple(map(var, eqn.outvars)),
                tuple((k, param(v)) for k, v in sorted(eqn.params.items()))) for eqn in jaxpr.eqns)
  return tuple(map(var, jaxpr.constvars)), tuple(map(var, jaxpr.invars)), eqns, tuple(map(var, jaxpr.outvars))


def _consts_key(consts: Sequence[Any]) -> tuple[str, ...]:
  return tuple(hashlib.sha1(np.asarray(c).tobytes()).hexdigest() + str(np.shape(c)) for c in consts)


def optimizer_key(optimizer: nnx.Optimizer, params: Any, state: Any) -> tuple[Any, ...]:
  """What an optimizer's update computes, as a hashable value: equal for two optimizers that update alike.

  The optimizer's class and ``wrt``, and :func:`function_key` of
  ``tx.update``, or where that cannot describe it, the jaxpr of
  ``tx.update`` on ``params`` and ``state`` (with digests of its constants).
  Two optimizers with the same key run the same program.

  Args:
    optimizer: an ``nnx.Optimizer``.
    params, state: the shapes of the parameters it updates and of its state
      (``jax.ShapeDtypeStruct`` trees), for the jaxpr.
  """
  described = function_key(optimizer.tx.update)
  if described is not None:
    return type(optimizer), optimizer.wrt, 'functions', described
  update = jax.make_jaxpr(optimizer.tx.update)(params, state, params)
  return type(optimizer), optimizer.wrt, 'jaxpr', _jaxpr_key(update.jaxpr), _consts_key(update.consts)
