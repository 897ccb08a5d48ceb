"""Jitted train and eval steps built from a user's ``loss_fn``.

A loss function has the signature ``loss_fn(model, batch) -> (loss, aux)``:
``loss`` is a scalar and ``aux`` a dict of scalar metrics computed in the same
forward pass (``has_aux=True``). The factories here turn it into

* ``train_step(model, optimizer, batch) -> metrics``: gradients with
  ``nnx.value_and_grad``, the update with ``optimizer.update(model, grads)``,
  in place; metrics hold ``loss``, ``grad_norm`` (the global norm of the raw
  gradients, *before* any clipping in the optimizer), ``learning_rate`` (the
  rate this update used, when the optimizer was built with
  ``optax.inject_hyperparams``) and everything in ``aux``. With
  ``loss_scale=`` (float16), dynamic loss scaling, and ``loss_scale`` and
  ``grads_finite`` in the metrics.
* ``train_step.many(model, optimizer, batches)``: ``K`` such steps in one
  dispatch, on batches stacked by :func:`stack_batches`.
* ``eval_step(model, batch) -> metrics``: the loss on a view of the model in
  evaluation mode (Dropout off, BatchNorm on its running averages), plus
  ``count``, the number of real examples in the batch.

The metrics stay on the device; pull them off only when you log them.

Why the train step is as fast as hand-written JAX: ``nnx.jit`` walks the
graph of the model and the optimizer in Python on every call, which costs
several times a small model's whole step. The train step walks it once per
(model, optimizer) pair, compiles one ``jax.jit`` function over the flat list
of their arrays (donated, so no second copy is held), and on each call reads
the arrays out of the same ``nnx.Variable`` objects and writes the new ones
back, after a check of about a microsecond that the structure did not
change. Where that cannot apply it falls back to ``nnx.jit`` by itself; see
:func:`make_train_step` for the rules.
"""

from __future__ import annotations

import functools
import inspect
import operator
import sys
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxtrain import precision
from flaxtrain.losses import LossFn
from flaxtrain.parallel import DataParallel
from flaxtrain.parallel import as_parallel
from flaxtrain.losses import softmax_cross_entropy_with_integer_labels
from flaxtrain.metrics import accuracy

__all__ = [
    'LossFn',
    'classification_loss',
    'current_learning_rate',
    'make_train_step',
    'TrainStep',
    'stack_batches',
    'make_eval_step',
    'eval_view',
    'evaluate',
]

Batch = Mapping[str, Any]


def classification_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy and accuracy of ``model`` on ``{'image', 'label'[, 'mask']}``.

  Args:
    model: maps ``batch['image']`` to logits ``(batch, num_classes)``.
    batch: dict with ``image``, integer ``label`` and optionally ``mask``
      (1 for real examples, 0 for padding).

  Returns:
    ``(loss, {'accuracy': accuracy})``.

  Raises:
    TypeError, ValueError: if ``batch`` is not a dict with ``image`` and
      ``label`` (checked while tracing: no device work is done).
  """
  if not isinstance(batch, Mapping):
    raise TypeError(f"batch: classification_loss expects a dict with keys 'image' and 'label' "
                    f"(and optionally 'mask'), got {_describe(batch)}")
  if not {'image', 'label'} <= set(batch):
    raise ValueError(f"batch: classification_loss expects the keys 'image' and 'label' (and optionally "
                     f"'mask'), got keys {sorted(batch)}; for other data pass loss_fn=your own "
                     'loss_fn(model, batch) -> (loss, aux)')
  logits = model(batch['image'])
  mask = batch.get('mask')
  loss = softmax_cross_entropy_with_integer_labels(logits, batch['label'], mask)
  return loss, {'accuracy': accuracy(logits, batch['label'], mask)}


def _check_loss_fn(loss_fn: Any) -> None:
  """Raises unless ``loss_fn`` is a callable that can be called as ``loss_fn(model, batch)``."""
  if not callable(loss_fn):
    raise TypeError(f'loss_fn: expected a callable loss_fn(model, batch) -> (loss, aux), got {loss_fn!r}')
  try:
    signature = inspect.signature(loss_fn)
  except (TypeError, ValueError):  # some builtins have none: nothing to check
    return
  try:
    signature.bind(None, None)
  except TypeError as error:
    name = getattr(loss_fn, '__name__', type(loss_fn).__name__)
    raise TypeError(
        'loss_fn: expected a function called as loss_fn(model, batch) -> (loss, aux), got '
        f'{name}{signature}, which cannot be called with (model, batch): {error}'
    ) from None


def _check_loss_output(loss: Any, aux: Any, reserved: tuple[str, ...]) -> None:
  """Checks, at trace time, that loss_fn returned a scalar and a dict of scalars."""
  if jnp.shape(loss) != ():
    raise ValueError(f'loss_fn: expected a scalar loss, got shape {jnp.shape(loss)}')
  if not isinstance(aux, Mapping):
    raise TypeError(f'loss_fn: expected aux to be a dict of scalar metrics, got {type(aux).__name__}')
  for name, value in aux.items():
    if name in reserved:
      raise ValueError(f'loss_fn: aux key {name!r} is reserved by the step (reserved: {reserved})')
    if jnp.shape(value) != ():
      raise ValueError(f'loss_fn: aux[{name!r}] must be a scalar, got shape {jnp.shape(value)}')


def current_learning_rate(optimizer: nnx.Optimizer) -> jax.Array | None:
  """The learning rate held in ``optimizer``'s state, or None if it holds none.

  Optax keeps the learning rate in the state only when the transformation was
  wrapped in ``optax.inject_hyperparams``; then, after each update, the state
  holds the rate that update used. The search looks through ``optax.chain``
  and nested states and returns the first ``learning_rate`` it finds.

  Args:
    optimizer: an ``nnx.Optimizer``.

  Returns:
    A scalar array, or None.

  Example:
    >>> tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # doctest: +SKIP
    >>> current_learning_rate(optimizer)                      # doctest: +SKIP
    Array(0.001, dtype=float32)
  """
  def search(state: Any) -> Any:
    hyperparams = getattr(state, 'hyperparams', None)
    if isinstance(hyperparams, Mapping) and 'learning_rate' in hyperparams:
      return hyperparams['learning_rate']
    if isinstance(state, (tuple, list)):  # chain states and NamedTuple states
      for child in state:
        found = search(child)
        if found is not None:
          return found
    return None

  found = search(optimizer.opt_state)
  if isinstance(found, nnx.Variable):
    found = found.get_value()
  return None if found is None else jnp.asarray(found)


# The train step ----------------------------------------------------------------

_MISSING = object()
_RESERVED = ('loss', 'grad_norm', 'learning_rate', 'loss_scale', 'grads_finite')
_MANY_MODES = ('auto', 'scan', 'unroll', 'loop')
_CACHE_SIZE = 8  # (model, optimizer) pairs the steps remember
_COMPILED_SIZE = 64  # compiled steps kept, over loss functions and structures


def _write_raw_values(variables: list[nnx.Variable], values: list[Any]) -> None:
  """Stores ``values[i]`` as the array held by ``variables[i]``, in place.

  The one place where flaxtrain relies on Flax internals: it writes the
  ``_raw_value`` slot that ``Variable.get_raw_value`` reads, as
  ``Variable.set_raw_value`` does, without its per-call checks (about 4 µs
  per Variable through ``set_value``, well under 0.1 µs this way). Only for
  plain Variables (no ``ref``, no ``hijax``) outside any trace; tested
  against ``get_value``/``set_value`` in tests/test_fast_step.py, with Flax
  0.12.8. Should a later Flax drop the slot, the public (slower)
  ``set_raw_value`` is used instead.
  """
  if _RAW_SLOT is None:
    for variable, value in zip(variables, values):
      variable.set_raw_value(value, _unsafe_bypass_check=True)
    return
  deque(map(_RAW_SLOT.__set__, variables, values), maxlen=0)


_RAW_SLOT = vars(nnx.Variable).get('_raw_value')  # the slot behind get_raw_value/set_raw_value
if not isinstance(_RAW_SLOT, types.MemberDescriptorType):
  _RAW_SLOT = None
# Reads what get_raw_value returns, in C (~30 ns per Variable against ~45 ns for the method).
_read_raw_values = nnx.Variable.get_raw_value if _RAW_SLOT is None else operator.attrgetter('_raw_value')


def _refcount_baseline() -> int:
  """References to an array held only by a Variable, counted as __call__ counts them."""
  variable = nnx.Variable(np.zeros(()))  # NumPy: importing flaxtrain starts no JAX backend
  return list(map(sys.getrefcount, list(map(_read_raw_values, [variable]))))[0]


_UNSHARED = _refcount_baseline()


def _donatable(entry: _Entry) -> list[Any]:
  """The arrays of ``entry``'s Variables, ready to donate.

  An array that something besides its Variable references (a user's
  ``w = model.out.kernel[...]``) is copied, and the copy donated, so that
  reference stays valid.
  """
  leaves = list(map(_read_raw_values, entry.variables))
  if list(map(sys.getrefcount, leaves)) != entry.unshared:
    counts = list(map(sys.getrefcount, leaves))
    leaves = [x if count == _UNSHARED else x.copy() for x, count in zip(leaves, counts)]
  return leaves


def _describe(value: Any) -> str:
  if isinstance(value, tuple):
    return f'a tuple of {len(value)}'
  shape = getattr(value, 'shape', None)
  return f'an array of shape {tuple(shape)}' if shape is not None else type(value).__name__


def _call_loss_fn(loss_fn: LossFn, model: nnx.Module, batch: Batch) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """Calls ``loss_fn`` (at trace time) and checks that it returned ``(scalar, dict of scalars)``."""
  out = loss_fn(model, batch)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
        'loss_fn: expected it to return a pair (loss, aux), aux a dict of scalar metrics '
        f'(return (loss, {{}}) for none), got {_describe(out)}'
    )
  loss, aux = out
  _check_loss_output(loss, aux, reserved=_RESERVED)
  return loss, aux


def _check_model_and_optimizer(model: Any, optimizer: Any) -> None:
  """Type checks, and that ``optimizer``'s state fits ``model``'s parameters (abstractly)."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  if not isinstance(optimizer, nnx.Optimizer):
    hint = (' (is the optimizer missing? the step is called as train_step(model, optimizer, batch))'
            if isinstance(optimizer, Mapping) else '')
    raise TypeError(
        f'optimizer: expected an nnx.Optimizer(model, tx, wrt=nnx.Param), got {type(optimizer).__name__}{hint}')
  want = jax.eval_shape(optimizer.tx.init, nnx.state(model, optimizer.wrt))
  got = nnx.state(optimizer, lambda path, _: path[:1] == ('opt_state',))
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))  # the order may differ
  if shapes(want) != shapes(got):
    missing = [shape for shape in shapes(want) if shape not in shapes(got)]
    raise ValueError(
        'optimizer: its state does not fit model (was it built for another model?): for the '
        f"model's parameters the optimizer needs {len(shapes(want))} arrays, holds {len(shapes(got))}, "
        f'and lacks arrays of shapes {missing[:4]}; build it as nnx.Optimizer(model, tx, wrt=nnx.Param) '
        'for this model'
    )


def _snapshot(root: Any) -> tuple[list[Any], list[Any]]:
  """The mutable containers of ``root``'s graph, and shallow copies of them.

  ``containers == copies`` (a C-level comparison, identity first) is False
  once anything in the graph was added, removed, replaced or switched
  (``model.out = nnx.Linear(...)``, ``model.eval()``, a list appended to).
  Returns None if the graph holds a node this check cannot see into.
  """
  containers = []
  for _, node in nnx.graph.iter_graph(root):
    if isinstance(node, nnx.Variable) or not nnx.graph.is_node(node):
      continue
    if type(node) in (dict, list):
      containers.append(node)
    elif nnx.graph.is_graph_node(node) and hasattr(node, '__dict__'):  # Modules, Optimizer, State
      attributes = vars(node)
      containers.append(attributes)
      containers.extend(v for v in attributes.values() if type(v) in (dict, list))
    elif nnx.graph.is_graph_node(node):
      return None
    # Other pytree nodes (tuples, NamedTuples, None, frozen dataclasses) are
    # immutable; their children are visited on their own.
  return containers, [_shallow_copy(c) for c in containers]


class _AnyPytreeState:
  """Equal to every ``PytreeState``: Flax's per-object bookkeeping, not structure.

  NNX transforms (an ``nnx.jit`` eval step, ``nnx.update``) give each object a
  new ``_pytree__state`` when they write back into it, although nothing in
  the graph was added, removed or replaced.
  """

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, nnx.pytreelib.PytreeState)

  __hash__ = None


_ANY_PYTREE_STATE = _AnyPytreeState()


def _shallow_copy(container: Any) -> Any:
  copy = type(container)(container)
  if type(copy) is dict and '_pytree__state' in copy:
    copy['_pytree__state'] = _ANY_PYTREE_STATE
  return copy


class _Entry:
  """What the steps know about one (model, optimizer) pair, shared by every step."""

  __slots__ = ('model', 'optimizer', 'live', 'copies', 'loose', 'fast', 'variables', 'graphdef', 'treedef',
               'fns', 'modes', 'slow', 'unshared')

  def watch(self, live: list[Any], loose: list[Any]) -> None:
    """Remembers the containers ``live`` and ``loose``, their copies from :func:`_snapshot`."""
    self.live, self.loose = live, loose
    self.copies = [type(c)(c) for c in live]  # exact copies: equal identity first, compared all in C

  def current(self, model: Any, optimizer: Any) -> bool:
    """Whether ``(model, optimizer)`` are this entry's, with the structure it saw (~0.6 µs)."""
    try:
      if self.model() is not model or self.optimizer() is not optimizer:
        return False
      if self.live == self.copies:
        return True
      if self.live == self.loose:  # only Flax's bookkeeping (_pytree__state) was replaced: re-copy
        self.copies = [type(c)(c) for c in self.live]
        return True
      return False
    except Exception:  # pylint: disable=broad-except  # e.g. an array attribute replaced: == is elementwise
      return False


# Module-level, so that a new step (each fit() call makes one) reuses what an
# earlier one checked and compiled for the same loss_fn and structure.
_ENTRIES: dict[tuple[int, int], _Entry] = {}
_COMPILED: dict[Any, Callable[..., Any]] = {}
_GENERAL: dict[Any, Callable[..., Any]] = {}


class _StructureChanged(Exception):
  """Raised at trace time when the step itself changed the graph (e.g. ``sow``)."""


def _entry(model: Any, optimizer: Any, batch: Any) -> _Entry:
  """The entry of (model, optimizer): found, or built after checking the arguments."""
  entry = _ENTRIES.get((id(model), id(optimizer)))
  if entry is not None and entry.current(model, optimizer) and batch is not _MISSING:
    return entry
  if batch is _MISSING:
    given = 1 if optimizer is _MISSING else 2
    missing = ('the optimizer and the batch are missing' if given == 1 else
               'the optimizer is missing' if isinstance(optimizer, Mapping) else 'the batch is missing')
    raise TypeError(f'train_step: expected train_step(model, optimizer, batch), got {given} '
                    f'argument{"s" if given > 1 else ""}; {missing}')
  _check_model_and_optimizer(model, optimizer)
  entry = _Entry()
  entry.model, entry.optimizer = weakref.ref(model), weakref.ref(optimizer)
  snapshot = _snapshot((model, optimizer))
  entry.graphdef, state = nnx.split((model, optimizer))
  entry.variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  entry.treedef = jax.tree.structure(state)
  entry.fns, entry.modes, entry.slow = {}, {}, set()
  entry.unshared = [_UNSHARED] * len(entry.variables)  # the reference counts of arrays nothing else holds
  entry.fast = snapshot is not None and bool(entry.variables) and all(
      not v.ref and not v.hijax and isinstance(v.get_raw_value(), (jax.Array, np.ndarray))
      for v in entry.variables)
  entry.watch(*(snapshot if snapshot is not None else ([], [])))
  if len(_ENTRIES) >= _CACHE_SIZE:
    _ENTRIES.pop(next(iter(_ENTRIES)))
  _ENTRIES[(id(model), id(optimizer))] = entry
  return entry


def _update(loss_fn: LossFn, model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch, loss_scale: Any):
  """One update of ``model`` and ``optimizer`` in place (traced); returns (metrics, next loss scale)."""
  if loss_scale is None:
    checked = functools.partial(_call_loss_fn, loss_fn)
    (loss, aux), grads = nnx.value_and_grad(checked, has_aux=True)(model, batch)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    extra = {}
  else:
    def scaled_loss_fn(model, batch):
      loss, aux = _call_loss_fn(loss_fn, model, batch)
      return precision.scale_loss(loss, loss_scale), (loss, aux)

    keep = nnx.Not(nnx.RngState)  # Dropout's streams advance even on a skipped step
    before = jax.tree.map(lambda x: x, nnx.state((model, optimizer), keep))
    (_, (loss, aux)), grads = nnx.value_and_grad(scaled_loss_fn, has_aux=True)(model, batch)
    grads = precision.unscale_grads(grads, loss_scale)
    finite = precision.all_finite(grads)
    grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    optimizer.update(model, grads)
    after = nnx.state((model, optimizer), keep)
    nnx.update((model, optimizer), jax.tree.map(lambda a, b: jnp.where(finite, a, b), after, before))
    extra = {'loss_scale': loss_scale.scale, 'grads_finite': finite.astype(jnp.float32)}
    loss_scale = precision.adjust_loss_scale(loss_scale, finite)
  metrics = {'loss': loss, 'grad_norm': grad_norm}
  learning_rate = current_learning_rate(optimizer)
  if learning_rate is not None:
    metrics['learning_rate'] = learning_rate
  return {**metrics, **extra, **aux}, loss_scale


def _general(loss_fn: LossFn) -> Callable[..., Any]:
  """The plain ``nnx.jit`` step: correct for everything, slower per call."""
  fn = _GENERAL.get(loss_fn)
  if fn is None:
    if len(_GENERAL) >= _COMPILED_SIZE:
      _GENERAL.pop(next(iter(_GENERAL)))
    fn = _GENERAL[loss_fn] = nnx.jit(functools.partial(_update, loss_fn))
  return fn


def _compiled(loss_fn: LossFn, entry: _Entry, kind: str, unroll: Any, packed: bool = False,
              parallel: DataParallel | None = None) -> tuple[Callable[..., Any], list[str] | None]:
  """The fast step over a flat list of arrays, one per loss_fn and structure, and its metric names.

  ``kind``: ``'one'`` (a step), ``'many'`` (a scan), ``'abstract'`` (not
  jitted, for tracing). ``packed``:
  the metrics come back as one float32 vector (names filled in at trace time).
  ``parallel``: the same function, told where its inputs and outputs live
  (``in_shardings``/``out_shardings``): the arrays at their placement on the
  mesh, the batch split along the mesh's data axis, the metrics replicated.
  """
  shardings = None
  if parallel is not None and kind != 'abstract':
    shardings = tuple(parallel.param_sharding(v) for v in map(_read_raw_values, entry.variables))
  key = (loss_fn, entry.graphdef, entry.treedef, kind, unroll, packed, shardings)
  found = _COMPILED.get(key)
  if found is not None:
    return found
  graphdef, treedef = entry.graphdef, entry.treedef
  names = [] if packed else None

  def one(leaves, batch, loss_scale):
    model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    metrics, loss_scale = _update(loss_fn, model, optimizer, batch, loss_scale)
    graphdef_after, state = nnx.split((model, optimizer))
    if graphdef_after != graphdef:
      raise _StructureChanged()
    if packed:
      names[:] = sorted(metrics)
      metrics = _pack(metrics)
    return jax.tree.leaves(state), metrics, loss_scale

  def many(leaves, batches, loss_scale):
    def body(carry, batch):
      leaves, metrics, loss_scale = one(carry[0], batch, carry[1])
      return (leaves, loss_scale), metrics
    (leaves, loss_scale), metrics = jax.lax.scan(body, (leaves, loss_scale), batches, unroll=unroll)
    return leaves, metrics, loss_scale

  if kind == 'abstract':
    fn = one
  elif shardings is None:
    fn = jax.jit(many if kind == 'many' else one, donate_argnums=(0,))
  else:
    batch = parallel.stacked_sharding if kind == 'many' else parallel.batch_sharding
    fn = jax.jit(many if kind == 'many' else one, donate_argnums=(0,),
                 in_shardings=(list(shardings), batch, parallel.replicated),
                 out_shardings=(list(shardings), parallel.replicated, parallel.replicated))
  if len(_COMPILED) >= _COMPILED_SIZE:
    _COMPILED.pop(next(iter(_COMPILED)))  # the oldest
  _COMPILED[key] = fn, names
  return fn, names


def _pack(metrics: Mapping[str, jax.Array]) -> jax.Array:
  """The metrics as one float32 vector, in sorted order of their names."""
  return jnp.stack([jnp.asarray(metrics[name], jnp.float32) for name in sorted(metrics)])


class _Packed:
  """Metrics of one or more steps in one array (what ``fit`` asks for: one transfer per step).

  ``values[..., i]`` is metric ``names[i]``; shape ``(len(names),)`` for one
  step, ``(K, len(names))`` for ``many``.
  """

  __slots__ = ('names', 'values')

  def __init__(self, names: list[str], values: jax.Array):
    self.names, self.values = names, values


class TrainStep:
  """The train step that :func:`make_train_step` returns; see there."""

  def __init__(self, loss_fn: LossFn, loss_scale: Any, *, packed: bool = False,
               parallel: DataParallel | None = None):
    self.loss_fn = loss_fn
    self._loss_scale = loss_scale
    self._packed = packed  # fit's steps return Packed metrics
    self._parallel = parallel  # a DataParallel: batches split over its mesh, arrays placed on it
    self._one_key = (loss_fn, 'one', None, packed, parallel)  # _function's key of the single step

  @property
  def parallel(self) -> DataParallel | None:
    """The :class:`flaxtrain.DataParallel` this step trains with, or None (one device)."""
    return self._parallel

  @property
  def loss_scale(self) -> Any:
    """The current :class:`flaxtrain.precision.DynamicLossScale`, or None without loss scaling."""
    return self._loss_scale

  @loss_scale.setter
  def loss_scale(self, value: Any) -> None:
    if (self._loss_scale is None) != (value is None):
      raise ValueError('loss_scale: a step made without loss scaling cannot start it later, nor the reverse; '
                       'make a new step with make_train_step(loss_fn, loss_scale=...)')
    if value is not None:
      precision._check_loss_scale(value)
    self._loss_scale = value

  def _function(self, entry: _Entry, kind: str, unroll: Any = None) -> tuple[Callable[..., Any], Any]:
    key = (self.loss_fn, kind, unroll, self._packed, self._parallel)
    found = entry.fns.get(key)  # hashing a graphdef is slow: look up by entry first
    if found is None:
      if self._parallel is not None:  # first use of this pair with this placement: put it on the mesh
        _write_raw_values(entry.variables,
                          self._parallel._place_arrays(list(map(_read_raw_values, entry.variables))))
      found = entry.fns[key] = _compiled(self.loss_fn, entry, kind, unroll, self._packed, self._parallel)
    return found

  def _apply(self, fn: Callable[..., Any], entry: _Entry, leaves: list[Any], batch: Any) -> Any:
    """Calls a fast function and writes the new arrays back; (new arrays, metrics), or None if it cannot."""
    try:
      new, metrics, loss_scale = fn(leaves, batch, self._loss_scale)
    except _StructureChanged:
      entry.slow.add(self.loss_fn)
      return None
    if isinstance(new[0], jax.core.Tracer):
      return None  # called inside an outer trace: the general path handles that
    _write_raw_values(entry.variables, new)
    self._loss_scale = loss_scale
    return new, metrics

  def _fast(self, entry: _Entry, kind: str, batch: Any, unroll: Any = None) -> Any:
    """One fast call (a step, or a scan of steps); the metrics, or None if it cannot."""
    fn, names = self._function(entry, kind, unroll)
    out = self._apply(fn, entry, _donatable(entry), batch)
    if out is None:
      return None
    return out[1] if names is None else _Packed(names, out[1])

  def _fast_loop(self, entry: _Entry, batches: Batch, steps: int) -> Any:
    """``steps`` calls of the compiled single step; None if it cannot.

    Less Python per step than a single call: the checks (entry, structure,
    donation) are done once, each step's new arrays go straight into the next
    call, and they are written back into the Variables once, at the end (or
    when a step raises, so the model keeps the last good arrays).
    """
    fn, names = self._function(entry, 'one')
    singles = _unstack(batches, steps)
    if self._parallel is not None:
      singles = [self._parallel._for_jit(batch) for batch in singles]
    leaves, rows, loss_scale = _donatable(entry), [], self._loss_scale
    try:
      for batch in singles:
        new, metrics, loss_scale = fn(leaves, batch, loss_scale)
        if not rows and isinstance(new[0], jax.core.Tracer):
          return None  # called inside an outer trace: the general path handles that
        leaves = new
        rows.append(metrics)
    except _StructureChanged:  # only a first call can raise it (tracing); nothing was applied then
      entry.slow.add(self.loss_fn)
      return None
    finally:
      if rows:
        _write_raw_values(entry.variables, leaves)
        self._loss_scale = loss_scale
    return _stack_metrics(rows) if names is None else _Packed(names, _stack_metrics(rows))

  def uses_fast_path(self, model: nnx.Module, optimizer: nnx.Optimizer) -> bool:
    """Whether calls with this (model, optimizer) take the fast path (after at least one call)."""
    entry = _ENTRIES.get((id(model), id(optimizer)))
    return entry is not None and entry.current(model, optimizer) and entry.fast and self.loss_fn not in entry.slow

  def __call__(self, model: nnx.Module, optimizer: nnx.Optimizer = _MISSING, batch: Batch = _MISSING,
               ) -> dict[str, jax.Array]:
    """One update of ``model`` and ``optimizer`` on ``batch``, in place; returns the metrics."""
    # The hot path, inlined (each Python call and tuple built here costs ~1% of a tiny model's step):
    # the entry and its structure check, the compiled step, the donation check, the write-back.
    entry = _ENTRIES.get((id(model), id(optimizer)))
    if entry is None or batch is _MISSING or not entry.current(model, optimizer):
      entry = _entry(model, optimizer, batch)
    if self._parallel is not None:  # checked; split over the devices by the compiled step's in_shardings
      batch = self._parallel._for_jit(batch)
    if entry.fast and self.loss_fn not in entry.slow:
      found = entry.fns.get(self._one_key)
      fn, names = found if found is not None else self._function(entry, 'one')
      try:
        new, metrics, loss_scale = fn(_donatable(entry), batch, self._loss_scale)
      except _StructureChanged:
        entry.slow.add(self.loss_fn)
      else:
        if not isinstance(new[0], jax.core.Tracer):  # a Tracer: called inside an outer trace
          _write_raw_values(entry.variables, new)
          self._loss_scale = loss_scale
          return metrics if names is None else _Packed(names, metrics)
    if self._parallel is not None:  # nnx.jit places nothing itself: give it the global arrays
      batch = self._parallel.shard_batch(batch)
    metrics, self._loss_scale = _general(self.loss_fn)(model, optimizer, batch, self._loss_scale)
    return _Packed(sorted(metrics), _pack_jit(metrics)) if self._packed else metrics

  def lower(self, model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> Any:
    """The step for these arguments, lowered (``jax.stages.Lowered``); nothing runs.

    ``train_step.lower(model, optimizer, batch).compile().memory_analysis()``
    shows what donation saves: ``alias_size_in_bytes`` is the state the
    outputs write over instead of holding a second copy of.
    """
    entry = _entry(model, optimizer, batch)
    if self._parallel is not None:
      batch = self._parallel.shard_batch(batch)
    if not entry.fast or self.loss_fn in entry.slow:
      return _general(self.loss_fn).lower(model, optimizer, batch, self._loss_scale)
    fn = self._function(entry, 'one')[0]  # with parallel, places the arrays first
    return fn.lower(list(map(_read_raw_values, entry.variables)), batch, self._loss_scale)

  def many(self, model: nnx.Module, optimizer: nnx.Optimizer, batches: Batch, *,
           mode: Literal['auto', 'scan', 'unroll', 'loop'] = 'auto') -> dict[str, jax.Array]:
    """``K`` updates in one dispatch; ``batches`` holds ``K`` batches stacked on a leading axis.

    Gives what ``K`` calls of ``train_step(model, optimizer, batch)`` give,
    batch by batch, and returns their metrics stacked: each of shape ``(K,)``.
    See :func:`make_train_step` for ``mode`` and the rule ``'auto'`` follows.
    """
    steps = _check_stacked('batches', batches)
    if mode not in _MANY_MODES:
      raise ValueError(f'mode: expected one of {_MANY_MODES}, got {mode!r}')
    if self._parallel is not None:
      self._parallel.check_batch(batches, stacked=True, name='batches')
    entry = _entry(model, optimizer, batches)
    if mode == 'auto':
      mode = self.many_mode(model, optimizer, batches)
    if self._parallel is not None and mode != 'loop':  # 'loop' splits them on the host first
      batches = self._parallel._for_jit(batches, stacked=True)
    if entry.fast and self.loss_fn not in entry.slow:
      if mode == 'loop':
        metrics = self._fast_loop(entry, batches, steps)
      else:
        metrics = self._fast(entry, 'many', batches, unroll=True if mode == 'unroll' else 1)
      if metrics is not None:
        return metrics
    rows = [self(model, optimizer, batch) for batch in _unstack(batches, steps)]
    if self._packed:
      return _Packed(rows[0].names, _stack_metrics([row.values for row in rows]))
    return _stack_metrics(rows)

  def many_mode(self, model: nnx.Module, optimizer: nnx.Optimizer, batches: Batch) -> str:
    """The mode ``many(..., mode='auto')`` uses for these arguments: ``'scan'`` or ``'loop'``."""
    _check_stacked('batches', batches)
    entry = _entry(model, optimizer, batches)
    key = (self.loss_fn, tuple((k, np.shape(v)[1:], str(v.dtype)) for k, v in sorted(batches.items())))
    mode = entry.modes.get(key)
    if mode is None:
      mode = 'scan'
      if jax.default_backend() == 'cpu':
        one_batch = {k: jax.ShapeDtypeStruct(np.shape(v)[1:], v.dtype) for k, v in batches.items()}
        leaves = list(map(_read_raw_values, entry.variables))  # traced only: nothing runs
        step = _compiled(self.loss_fn, entry, 'abstract', None)[0]
        if _uses_convolution(jax.make_jaxpr(step)(leaves, one_batch, self._loss_scale).jaxpr):
          mode = 'loop'
      entry.modes[key] = mode
    return mode


_pack_jit = jax.jit(_pack)


@jax.jit
def _unstack_on_device(batches: Batch) -> list[dict[str, jax.Array]]:
  steps = len(next(iter(batches.values())))
  return [{key: value[i] for key, value in batches.items()} for i in range(steps)]


def _unstack(batches: Batch, steps: int) -> list[dict[str, Any]]:
  """The ``steps`` single batches of a stack: NumPy views on the host, or one split on the device."""
  if all(isinstance(value, np.ndarray) for value in batches.values()):
    return [{key: value[i] for key, value in batches.items()} for i in range(steps)]
  return _unstack_on_device(dict(batches))


@jax.jit
def _stack_metrics(rows: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Stacks per-step metrics on a new leading axis, in one dispatch."""
  return jax.tree.map(lambda *values: jnp.stack(values), *rows)


def _uses_convolution(jaxpr: Any) -> bool:
  """True if ``jaxpr`` or any jaxpr nested in it (pjit, custom_vjp, scan...) holds a convolution."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      return True
    for sub in _subjaxprs(eqn.params):
      if _uses_convolution(sub):
        return True
  return False


def _subjaxprs(params: Mapping[str, Any]) -> Iterable[Any]:
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns'):
        yield item
      elif hasattr(item, 'jaxpr') and hasattr(item.jaxpr, 'eqns'):
        yield item.jaxpr


def _check_stacked(name: str, batches: Any) -> int:
  """The number of stacked batches; raises unless every array shares one leading axis."""
  if not isinstance(batches, Mapping) or not batches:
    raise TypeError(f'{name}: expected a dict of arrays with a leading axis of K batches '
                    f'(see stack_batches), got {_describe(batches)}')
  sizes = {key: (np.shape(value)[0] if np.ndim(value) else None) for key, value in batches.items()}
  if len(set(sizes.values())) != 1 or None in sizes.values() or 0 in sizes.values():
    raise ValueError(f'{name}: expected every array to have the same leading axis K >= 1 '
                     f'(the number of steps), got leading sizes {sizes}')
  return next(iter(sizes.values()))


def stack_batches(batches: Sequence[Batch]) -> dict[str, Any]:
  """Stacks ``K`` batches into one, with a new leading axis, for ``train_step.many``.

  Args:
    batches: a non-empty sequence of dicts with the same keys, each key's
      arrays of one shape and dtype in every batch (a ragged last batch
      does not stack: run it with a single step).

  Returns:
    ``{key: array of shape (K, *shape)}``; NumPy arrays if every input was
    one (stacked on the host, sent to the device in one transfer by the step),
    JAX arrays otherwise.

  Example:
    >>> batches = [{'x': np.zeros((4, 2))}, {'x': np.ones((4, 2))}]
    >>> stack_batches(batches)['x'].shape
    (2, 4, 2)
  """
  if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or not batches:
    raise TypeError(f'batches: expected a non-empty list of batch dicts, got {_describe(batches)}'
                    + (f' of length {len(batches)}' if isinstance(batches, Sequence) else ''))
  first = batches[0]
  if not isinstance(first, Mapping):
    raise TypeError(f'batches[0]: expected a dict of arrays, got {_describe(first)}')
  spec = {key: (np.shape(value), np.asarray(value).dtype if not isinstance(value, jax.Array) else value.dtype)
          for key, value in first.items()}
  for index, batch in enumerate(batches):
    if not isinstance(batch, Mapping) or set(batch) != set(spec):
      raise ValueError(f'batches[{index}]: expected a dict with keys {sorted(spec)} like batches[0], got '
                       + (f'keys {sorted(batch)}' if isinstance(batch, Mapping) else _describe(batch)))
    for key, (shape, dtype) in spec.items():
      value = batch[key]
      got = (np.shape(value), value.dtype if hasattr(value, 'dtype') else np.asarray(value).dtype)
      if got != (shape, dtype):
        raise ValueError(f'batches[{index}][{key!r}]: expected shape {shape} and dtype {dtype} like '
                         f'batches[0], got shape {got[0]} and dtype {got[1]}')
  stack = np.stack if all(isinstance(v, np.ndarray) for b in batches for v in b.values()) else jnp.stack
  return {key: stack([batch[key] for batch in batches]) for key in spec}


def _make_packed_train_step(loss_fn: LossFn, loss_scale: Any, parallel: Any = None) -> TrainStep:
  """``make_train_step``'s step, returning :class:`_Packed` metrics (for ``fit``: one transfer a step)."""
  step = make_train_step(loss_fn, loss_scale=loss_scale, parallel=parallel)  # checks the arguments
  return TrainStep(step.loss_fn, step.loss_scale, packed=True, parallel=step.parallel)


def make_train_step(loss_fn: LossFn = classification_loss, *, loss_scale: Any = None,
                    parallel: DataParallel | bool | None = None) -> TrainStep:
  """Returns ``train_step(model, optimizer, batch) -> metrics``, compiled.

  The step updates ``model`` and ``optimizer`` in place, so both are current
  after every call, and returns a dict of scalar device arrays: ``loss``,
  ``grad_norm`` (before any clipping), ``learning_rate`` (if the optimizer
  state holds one), the keys of ``aux`` and, with loss scaling,
  ``loss_scale`` and ``grads_finite``.

  How it is fast: on the first call with a (model, optimizer) pair the step
  collects their Variables and compiles one ``jax.jit`` function over the
  flat list of their arrays; later calls pass the arrays in and write the new
  ones back into the same Variables, with no walk over the module graph. A
  cheap check on every call (shallow copies of the graph's containers,
  compared by identity) notices when the structure changed (a replaced
  submodule, ``model.eval()``, ``nnx.update`` with new Variables) and
  collects again. Where this path cannot apply (Variables that are refs or
  hijax, a step that changes the graph itself such as ``sow``, a call inside
  another transform) the step falls back to ``nnx.jit`` by itself, with the
  same results.

  Donation: the arrays the step replaces are donated to the computation, so
  a step does not hold two copies of the parameters and optimizer state.
  Arrays that something else still references (``w = model.out.kernel[...]``
  kept from before the step) are never donated: that call copies them first
  and donates the copies, so ``w`` stays valid (nothing is recompiled).

  Many steps per dispatch: ``train_step.many(model, optimizer, batches)``
  runs ``K`` steps on batches stacked on a leading axis (see
  :func:`stack_batches`) in one call, the same updates as ``K`` single
  calls, and returns metrics of shape ``(K,)``. ``mode='auto'`` picks
  ``'scan'`` (a ``jax.lax.scan`` loop on the device) except on the CPU
  backend when the step holds a convolution: XLA's CPU convolutions run many
  times slower inside a compiled loop, so there it picks ``'loop'`` (one
  dispatch per step, never slower than single calls). ``'unroll'`` (the scan
  fully unrolled: no loop, but compile time grows with ``K``) can be asked
  for; ``train_step.many_mode(model, optimizer, batches)`` tells the choice.

  Many devices: with ``parallel=ft.DataParallel()`` the same step trains
  data-parallel on a device mesh. On its first call with a (model,
  optimizer) pair it places their arrays on the mesh (replicated, or split
  with ``params='sharded'``); each call splits the batch over the devices
  (one ``jax.device_put`` from the host; its batch size must be a multiple
  of the device count) and runs the compiled step, told those placements,
  on all devices at once. The loss and gradients are those of the whole
  (global) batch: the results match one device's up to float rounding.
  ``many`` splits each stacked batch the same way.

  Args:
    loss_fn: ``loss_fn(model, batch) -> (loss, aux)``: a scalar loss and a
      dict of scalar metrics; the model and the batch are arguments, never
      captured, so each call trains on the batch it is given.
    loss_scale: a :class:`flaxtrain.precision.DynamicLossScale` to train with
      dynamic loss scaling (float16): the step differentiates ``loss *
      scale``, unscales the gradients in float32 and, if any is not finite,
      leaves the parameters and the optimizer state unchanged (RNG streams
      still advance) and lowers the scale. The current state is
      ``train_step.loss_scale``. ``loss`` and ``grad_norm`` are unscaled.
    parallel: a :class:`flaxtrain.DataParallel` to train data-parallel on its
      devices, True for ``DataParallel()`` (all devices), or None (the
      default: one device, as without it).

  Returns:
    The step, a callable ``TrainStep``. Besides ``many`` and ``many_mode``:
    ``loss_scale`` (the current state), ``lower(model, optimizer, batch)``
    (the compiled step's ``jax.stages.Lowered``, e.g. for
    ``.compile().memory_analysis()``) and ``uses_fast_path(model,
    optimizer)``.

  Example:
    >>> train_step = make_train_step()
    >>> metrics = train_step(model, optimizer, batch)                        # doctest: +SKIP
    >>> metrics = train_step.many(model, optimizer, stack_batches(batches))  # doctest: +SKIP
  """
  _check_loss_fn(loss_fn)
  if loss_scale is not None:
    precision._check_loss_scale(loss_scale)
  return TrainStep(loss_fn, loss_scale, parallel=as_parallel(parallel))


def eval_view(model: nnx.Module) -> nnx.Module:
  """A view of ``model`` in evaluation mode, sharing its arrays.

  Dropout becomes the identity and BatchNorm uses its running averages. The
  original ``model`` keeps its own mode, so a training loop need not switch it
  back after validation.
  """
  return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


def make_eval_step(loss_fn: LossFn = classification_loss, *,
                   parallel: DataParallel | bool | None = None) -> Callable[..., dict[str, jax.Array]]:
  """Returns ``eval_step(model, batch) -> metrics``, jitted, in evaluation mode.

  Args:
    loss_fn: the same ``loss_fn(model, batch) -> (loss, aux)`` as training.
    parallel: a :class:`flaxtrain.DataParallel` (or True for all devices):
      each batch is split over its devices (its size must be a multiple of
      the device count, padded batches included); None: one device.

  Returns:
    A function that leaves ``model`` unchanged and returns ``loss``, the keys
    of ``aux`` and ``count`` (the sum of ``batch['mask']``, or the batch size).
  """
  _check_loss_fn(loss_fn)
  parallel = as_parallel(parallel)

  @nnx.jit
  def eval_step(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    loss, aux = loss_fn(eval_view(model), batch)
    _check_loss_output(loss, aux, reserved=('loss', 'count'))
    if 'mask' in batch:
      count = jnp.sum(batch['mask']).astype(jnp.float32)
    else:
      count = jnp.float32(len(jax.tree.leaves(batch)[0]))
    return {'loss': loss, **aux, 'count': count}

  return eval_step if parallel is None else _split_batches(eval_step, parallel)


def _split_batches(eval_step: Callable[..., Any], parallel: DataParallel) -> Callable[..., Any]:
  """``eval_step`` on batches split over ``parallel``'s devices (also fit's cached eval step)."""
  def parallel_eval_step(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    return eval_step(model, parallel.shard_batch(batch))

  parallel_eval_step.parallel = parallel
  return parallel_eval_step


def evaluate(
    eval_step: Callable[..., Mapping[str, jax.Array]],
    model: nnx.Module,
    batches: Iterable[Batch],
    *,
    parallel: DataParallel | bool | None = None,
) -> dict[str, float]:
  """Runs ``eval_step`` over ``batches`` and averages, weighting by ``count``.

  The per-batch metrics stay on the device until the end, then come back in
  one transfer.

  Args:
    eval_step: from :func:`make_eval_step`.
    model: the model to evaluate.
    batches: an iterable of batches (padded batches carry a ``mask``).
    parallel: a :class:`flaxtrain.DataParallel` (or True for all devices) to
      split each batch over; None leaves the batches as they are (an
      ``eval_step`` made with ``parallel=`` splits them itself).

  Returns:
    ``{name: mean}`` as Python floats, plus ``count``, the examples seen.
    ``accuracy`` is exact: each batch's accuracy times its count is rounded
    to the whole number of correct predictions it stands for, and the sum of
    those integers is divided by the number of examples, so two evaluations
    with the same number of correct predictions give the same float (357
    correct out of 360 is ``357 / 360`` whatever the batching).

  Raises:
    ValueError: if ``batches`` is empty.
  """
  parallel = as_parallel(parallel)
  if parallel is not None:
    batches = map(parallel.shard_batch, batches)
  results = [eval_step(model, batch) for batch in batches]
  if not results:
    raise ValueError('batches: expected at least one batch, got an empty iterable')
  results = jax.device_get(results)
  counts = np.array([r['count'] for r in results], dtype=np.float64)
  total = counts.sum()
  summary = {
      name: float(np.dot(counts, [r[name] for r in results]) / max(total, 1.0))
      for name in results[0] if name not in ('count', 'accuracy')
  }
  if 'accuracy' in results[0]:
    summary['accuracy'] = _exact_accuracy(counts, np.array([r['accuracy'] for r in results], np.float64))
  summary['count'] = float(total)
  return summary


def _exact_accuracy(counts: np.ndarray, accuracies: np.ndarray) -> float:
  """Correct predictions over examples, from per-batch float32 accuracies and counts.

  Falls back to the count-weighted mean when the numbers are not counts
  (fractional mask weights, or an ``accuracy`` that is not a fraction of
  examples).
  """
  correct = counts * accuracies  # a whole number up to float32 rounding (relative 6e-8)
  whole = np.rint(correct)
  if np.all(counts == np.rint(counts)) and np.all(np.abs(correct - whole) <= 1e-6 * np.maximum(counts, 1)):
    return int(whole.sum()) / max(int(counts.sum()), 1)
  return float(correct.sum() / max(counts.sum(), 1.0))
