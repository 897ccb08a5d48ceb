"""The train step, built from a user's ``loss_fn``, and the state it runs on.

A loss function has the signature ``loss_fn(model, batch) -> (loss, aux)``
(see :class:`flaxtrain.LossFn`). :func:`make_train_step` turns it into

* ``train_step(model, optimizer, batch) -> metrics``: gradients with
  ``nnx.value_and_grad``, the update with ``optimizer.update(model, grads)``;
  ``model`` and ``optimizer`` are current after every call. The metrics hold
  ``loss``, ``grad_norm`` (the global norm of the raw gradients, *before* any
  clipping in the optimizer), ``learning_rate`` (the rate this update used,
  when the optimizer was built with ``optax.inject_hyperparams``) and
  everything in ``aux``; with ``loss_scale=`` (float16), also ``loss_scale``
  and ``grads_finite``.
* ``train_step.many(model, optimizer, batches)``: ``K`` such steps in one
  dispatch, on batches stacked by :func:`stack_batches`.

The metrics stay on the device; pull them off only when you log them.

How it works, with Flax's and JAX's public API only (the recipe notebook 09
teaches): ``nnx.split((model, optimizer))`` takes the objects apart once into
their structure (a ``GraphDef``) and their arrays. One function,
:func:`train_arrays`, takes the arrays as a flat list, rebuilds the objects
with ``nnx.merge`` inside the trace, applies the update and returns the new
arrays. Under ``jax.jit`` (:func:`compiled_step`) the structure is a static
argument, so JAX compiles it once per structure and loss function, for every
model of that structure. A :class:`TrainState` holds the split: ``fit`` keeps
its arrays as a plain value from step to step, donating them to each step
(so it never holds two copies of the state), and writes them back into the
Variables only where the objects must be current; ``train_step(model,
optimizer, batch)`` writes back after every call, after checking with
``jax.tree.flatten`` that the objects still have the structure it split.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxtrain import precision
from flaxtrain.keys import optimizer_key
from flaxtrain.losses import LossFn
from flaxtrain.losses import call_loss_fn
from flaxtrain.losses import check_loss_fn
from flaxtrain.losses import describe
from flaxtrain.losses import softmax_cross_entropy_with_integer_labels
from flaxtrain.metrics import accuracy
from flaxtrain.parallel import DataParallel
from flaxtrain.parallel import as_parallel

__all__ = [
    'DeviceBatches',
    'as_device_batches',
    'LossFn',
    'MetricsBuffer',
    'RESERVED',
    'StepSpec',
    'StructureChanged',
    'TrainState',
    'TrainStep',
    'check_model_and_optimizer',
    'classification_loss',
    'current_learning_rate',
    'compiled_step',
    'copy_arrays',
    'make_train_step',
    'many_mode',
    'metric_names',
    'optimizer_key',
    'stack_batches',
    'train_arrays',
    'update',
]

Batch = Mapping[str, Any]
RESERVED = ('loss', 'grad_norm', 'learning_rate', 'loss_scale', 'grads_finite')
_MANY_MODES = ('auto', 'scan', 'unroll', 'loop')
_MISSING = object()


def classification_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy and accuracy of ``model`` on ``{'image', 'label'[, 'mask']}``.

  ``'image'`` is simply the input the model is called on: images, or rows of
  tabular features (``DataLoader({'image': features, 'label': labels}, ...)``).

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
                    f"(and optionally 'mask'), got {describe(batch)}")
  if not {'image', 'label'} <= set(batch):
    raise ValueError(f"batch: classification_loss expects the keys 'image' and 'label' (and optionally "
                     f"'mask'), got keys {sorted(batch)}; for other data pass loss_fn=your own "
                     'loss_fn(model, batch) -> (loss, aux)')
  logits = model(batch['image'])
  mask = batch.get('mask')
  loss = softmax_cross_entropy_with_integer_labels(logits, batch['label'], mask)
  return loss, {'accuracy': accuracy(logits, batch['label'], mask)}


def current_learning_rate(optimizer: nnx.Optimizer) -> jax.Array | None:
  """The learning rate held in ``optimizer``'s state, or None if it holds none.

  Optax keeps the learning rate in the state only when the transformation was
  wrapped in ``optax.inject_hyperparams``; then, after each update, the state
  holds the rate that update used. The search looks through ``optax.chain``
  and nested states (``optax.tree.get_all_with_path``) and returns the first
  ``learning_rate`` among the injected hyperparameters.

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
  found = next((value for path, value in optax.tree.get_all_with_path(optimizer.opt_state, 'learning_rate')
                if any(getattr(key, 'name', None) == 'hyperparams' for key in path)), None)
  if isinstance(found, nnx.Variable):
    found = found.get_value()
  return None if found is None else jnp.asarray(found)


def _check_types(model: Any, optimizer: Any) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  if not isinstance(optimizer, nnx.Optimizer):
    hint = (' (is the optimizer missing? the step is called as train_step(model, optimizer, batch))'
            if isinstance(optimizer, Mapping) else '')
    raise TypeError(
        f'optimizer: expected an nnx.Optimizer(model, tx, wrt=nnx.Param), got {type(optimizer).__name__}{hint}')


def check_model_and_optimizer(model: Any, optimizer: Any, state: Any = None) -> tuple[Any, Any]:
  """Type checks, and that ``optimizer``'s state fits ``model``'s parameters (shapes only).

  Args:
    model: should be an ``nnx.Module``.
    optimizer: should be ``nnx.Optimizer(model, tx, wrt=...)`` for this model.
    state: ``nnx.split((model, optimizer))[1]`` if the caller has it (saves
      walking the objects again), else None.

  Returns:
    The shapes of the parameters ``optimizer`` updates and of a fresh
    optimizer state for them (``jax.ShapeDtypeStruct`` trees).

  Raises:
    TypeError, ValueError: naming the argument, what was expected and given.
  """
  _check_types(model, optimizer)
  if state is None:
    state = nnx.split((model, optimizer))[1]
  shape_of = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  params = jax.tree.map(shape_of, nnx.filter_state(state[0], optimizer.wrt))
  want = jax.eval_shape(optimizer.tx.init, params)
  got = state[1]['opt_state'] if 'opt_state' in state[1] else ()  # a state of no arrays is left out
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))  # the order may differ
  if shapes(want) != shapes(got):
    missing = [shape for shape in shapes(want) if shape not in shapes(got)]
    raise ValueError(
        'optimizer: its state does not fit model (was it built for another model?): for the '
        f"model's parameters the optimizer needs {len(shapes(want))} arrays, holds {len(shapes(got))}, "
        f'and lacks arrays of shapes {missing[:4]}; build it as nnx.Optimizer(model, tx, wrt=nnx.Param) '
        'for this model'
    )
  return params, want


# The update, traced -------------------------------------------------------------


def update(loss_fn: LossFn, model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch,
           loss_scale: precision.DynamicLossScale | None) -> tuple[dict[str, jax.Array], Any]:
  """One update of ``model`` and ``optimizer`` in place, as traced inside a jitted step.

  Args:
    loss_fn: ``loss_fn(model, batch) -> (loss, aux)``.
    model, optimizer: the objects to update (inside the trace).
    batch: one batch.
    loss_scale: a :class:`flaxtrain.DynamicLossScale`, or None.

  Returns:
    ``(metrics, next loss_scale)``.
  """
  if loss_scale is None:
    checked = functools.partial(call_loss_fn, loss_fn, reserved=RESERVED)
    (loss, aux), grads = nnx.value_and_grad(checked, has_aux=True)(model, batch)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    extra = {}
  else:
    def scaled_loss_fn(model, batch):
      loss, aux = call_loss_fn(loss_fn, model, batch, reserved=RESERVED)
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


class StructureChanged(Exception):
  """Raised while tracing when the step itself changed the object graph (e.g. ``Module.sow``)."""


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
  """What a compiled step depends on besides the values of its arrays.

  It is the static argument of :func:`train_arrays`, so JAX compiles once
  per spec. Two specs are equal when their structures, loss functions and
  placements are, so a second model of the same structure reuses the code
  compiled for the first. The hash is computed once, since hashing a
  ``GraphDef`` costs tens of microseconds and JAX hashes static arguments on
  every call.

  Attributes:
    graphdef: ``nnx.split((model, optimizer))[0]``.
    treedef: the pytree structure of the split state.
    loss_fn: the loss function.
    shardings: with many devices, the placement of each array (a tuple), else None.
    replicated: with many devices, the placement of the metrics, else None.
    structure: what identifies ``graphdef`` for the cache, if not the
      graphdef itself: for a model and its optimizer, the model's graphdef
      and :func:`optimizer_key` (an optax transformation is a new closure
      each time it is built, so two equal optimizers never compare equal).
  """
  graphdef: Any
  treedef: Any
  loss_fn: Any
  shardings: tuple[Any, ...] | None = None
  replicated: Any = None
  structure: Any = None  # compared in place of graphdef when given (see optimizer_key)

  def __post_init__(self):
    structure = self.graphdef if self.structure is None else self.structure
    key = (structure, self.treedef, self.loss_fn, self.shardings, self.replicated)
    object.__setattr__(self, 'key', key)
    object.__setattr__(self, 'key_hash', hash(key))

  def __hash__(self) -> int:
    return self.key_hash

  def __eq__(self, other: Any) -> bool:
    # JAX compares the spec of every call with the one its cache holds: after one full comparison
    # the two remember each other, so later calls compare by identity.
    if self is other or other is self.__dict__.get('twin'):
      return True
    if not (isinstance(other, StepSpec) and self.key_hash == other.key_hash and self.key == other.key):
      return False
    object.__setattr__(self, 'twin', other)
    object.__setattr__(other, 'twin', self)
    return True


def step_arrays(spec: StepSpec, arrays: list[jax.Array], batch: Batch, loss_scale: Any):
  """One update on flat arrays (traced): ``(new arrays, metrics, next loss_scale)``."""
  model, optimizer = nnx.merge(spec.graphdef, jax.tree.unflatten(spec.treedef, arrays))
  metrics, loss_scale = update(spec.loss_fn, model, optimizer, batch, loss_scale)
  graphdef, state = nnx.split((model, optimizer))
  if graphdef != spec.graphdef:
    raise StructureChanged('the step changed the structure of the model or optimizer')
  new = jax.tree.leaves(state)
  if spec.shardings is not None:
    new = [jax.lax.with_sharding_constraint(x, s) for x, s in zip(new, spec.shardings)]
    metrics = jax.lax.with_sharding_constraint(metrics, spec.replicated)
  return new, metrics, loss_scale


class DeviceBatches(NamedTuple):
  """An epoch's batches on the device: ``data`` rows gathered by ``order[position]`` inside the step.

  ``fit`` passes this in place of a batch when its loader's data fits on the
  device: the epoch's order goes over once, and no batch is sliced, stacked
  or copied on the host. The step returns the advanced ``position`` (not the data: that would copy it).

  Attributes:
    data: the loader's arrays, whole, on the device.
    order: ``(batches, batch_size)`` example indices of each batch of the epoch.
    position: the index of the next batch (an int32 scalar on the device).
  """
  data: dict[str, jax.Array]
  order: jax.Array
  position: jax.Array


class MetricsBuffer(NamedTuple):
  """Rows of packed step metrics kept on the device until ``fit`` logs them.

  Attributes:
    values: ``(capacity, len(names))`` float32, one row per step, the
      metrics in sorted order of their names.
    count: the rows written (an int32 scalar on the device).
  """
  values: jax.Array
  count: jax.Array


def as_device_batches(batch: Any, steps: int | None, orders: dict[tuple[int, int], np.ndarray]) -> Any:
  """``batch`` (one, or ``steps`` stacked) as :class:`DeviceBatches` over its own rows, where it can be.

  Every train step gathers its batch this way, whether the rows come from
  the host or from data already on the device (``fit``'s :class:`DeviceBatches`
  of a whole epoch): XLA then compiles one program for both, and they compute
  the same numbers to the bit. A batch whose arrays do not share one batch
  axis is returned as it is.

  Args:
    batch: a dict of arrays.
    steps: None for one batch, else the number of stacked batches.
    orders: the caller's identity orders by ``(steps, rows)``, reused between calls.
  """
  axes = 1 if steps is None else 2
  sizes = {np.shape(v)[:axes] for v in batch.values()} if isinstance(batch, Mapping) and batch else set()
  if len(sizes) != 1 or len(next(iter(sizes))) != axes or not all(hasattr(v, 'reshape') for v in batch.values()):
    return batch
  rows = int(np.prod(next(iter(sizes))))
  count = steps or 1
  if (count, rows) not in orders:
    orders[count, rows] = np.arange(rows, dtype=np.int32).reshape(count, rows // count)  # host: compiles nothing
  data = batch if steps is None else {k: v.reshape(rows, *np.shape(v)[axes:]) for k, v in batch.items()}
  return DeviceBatches(data, orders[count, rows], np.int32(0))


def _pack(metrics: Mapping[str, jax.Array]) -> jax.Array:
  """The metrics as one float32 vector (or ``(K, n)`` rows), in sorted order of their names."""
  return jnp.stack([jnp.asarray(metrics[name], jnp.float32) for name in sorted(metrics)], axis=-1)


def train_arrays(arrays: list[jax.Array], batch: Batch | DeviceBatches, loss_scale: Any,
                 buffer: MetricsBuffer | None = None, *, spec: StepSpec, steps: int | None = None,
                 unroll: int | bool = 1):
  """The train step over flat arrays: what :func:`compiled_step` compiles (once per ``spec``).

  Args:
    arrays: the leaves of ``nnx.split((model, optimizer))[1]``.
    batch: one batch, or with ``steps=K`` the ``K`` batches stacked on a
      leading axis (run in a ``jax.lax.scan``); or :class:`DeviceBatches`.
    loss_scale: a :class:`flaxtrain.DynamicLossScale`, or None.
    buffer: a :class:`MetricsBuffer` to append the packed metrics to
      (donated), or None to return them.
    spec: the :class:`StepSpec` (static: one compilation per spec).
    steps: None for one step, else the number of stacked batches.
    unroll: the scan's ``unroll``.

  Returns:
    ``(new arrays, metrics or the buffer, next loss_scale, next position)``:
    with ``steps`` each metric has shape ``(K,)``; the next position is that
    of the :class:`DeviceBatches` after these steps (None for a plain batch).
  """
  following = None
  if isinstance(batch, DeviceBatches):
    take = lambda rows: {key: jnp.take(value, rows, axis=0) for key, value in batch.data.items()}
    if steps is None:
      one = take(jax.lax.dynamic_index_in_dim(batch.order, batch.position, keepdims=False))
    else:
      one = jax.lax.dynamic_slice_in_dim(batch.order, batch.position, steps)
    following = batch.position + (steps or 1)  # only the position: returning the data would copy it
  else:
    take, one = None, batch
  if steps is None:
    arrays, metrics, loss_scale = step_arrays(spec, arrays, one, loss_scale)
  else:
    def body(carry, xs):
      new, metrics, scale = step_arrays(spec, carry[0], take(xs) if take else xs, carry[1])
      return (new, scale), metrics

    (arrays, loss_scale), metrics = jax.lax.scan(body, (arrays, loss_scale), one, unroll=unroll)
  if buffer is not None:
    rows = _pack(metrics).reshape(-1, len(metrics))
    metrics = MetricsBuffer(jax.lax.dynamic_update_slice_in_dim(buffer.values, rows, buffer.count, 0),
                            buffer.count + rows.shape[0])
  return arrays, metrics, loss_scale, following


_STATIC = ('spec', 'steps', 'unroll')
_step_donating = jax.jit(train_arrays, static_argnames=_STATIC, donate_argnames=('arrays', 'buffer'))
_step_keeping = jax.jit(train_arrays, static_argnames=_STATIC, donate_argnames=('buffer',))


@jax.jit
def copy_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
  """New buffers holding ``arrays``' values, in one dispatch (what ``fit`` steps on, and donates)."""
  return [jnp.copy(x) for x in arrays]


def compiled_step(donate: bool = True) -> Callable[..., Any]:
  """:func:`train_arrays` under ``jax.jit``: donating its ``arrays`` (``fit``), or keeping them.

  The same step either way; the two are compiled separately, since donation
  is part of the compiled program.
  """
  return _step_donating if donate else _step_keeping


def metric_names(state: 'TrainState', batch: Batch, loss_scale: Any) -> list[str]:
  """The names of the step's metrics, in the order :class:`MetricsBuffer` packs them (traced once per spec)."""
  out = _step_keeping.eval_shape(state.read(), batch, loss_scale, spec=state.spec)
  return sorted(out[1])


def _is_variable(x: Any) -> bool:
  # By type: nnx.Variable's isinstance also answers for tracers and hijax Variables, at about 1 µs a
  # node, on every call of the step; neither can occur in the objects a TrainState splits.
  return issubclass(type(x), nnx.Variable)


class TrainState:
  """``(model, optimizer)`` split once: their Variables, and the step's spec.

  Reading and writing go through the Variables' public
  ``get_raw_value``/``set_raw_value``. ``fit`` reads the arrays once, steps
  on them as a value, and calls :meth:`write` where the objects must be
  current.

  Attributes:
    spec: the :class:`StepSpec` of this structure.
    variables: the distinct Variables of the split, in the order of the
      compiled step's arrays.
  """

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: LossFn,
               parallel: DataParallel | None = None, *, track: bool = True, place: bool = True):
    _check_types(model, optimizer)  # before nnx.split touches them
    graphdef, state = nnx.split((model, optimizer))
    params, opt_state = check_model_and_optimizer(model, optimizer, state)
    self.model, self.optimizer = model, optimizer
    self.variables = jax.tree.leaves(state, is_leaf=_is_variable)
    treedef = jax.tree.structure(state)
    self.fast = treedef.num_leaves == len(self.variables) and all(
        not v.ref and not v.hijax and isinstance(v.get_raw_value(), (jax.Array, np.ndarray))
        for v in self.variables)
    shardings = replicated = None
    if parallel is not None and self.fast:
      shardings = tuple(parallel.param_sharding(v.get_raw_value()) for v in self.variables)
      replicated = parallel.replicated
    self.parallel = parallel if self.fast else None
    if place:
      self.place()
    structure = (nnx.graphdef(model), optimizer_key(optimizer, params, opt_state))
    self.spec = StepSpec(graphdef, treedef, loss_fn, shardings, replicated, structure)
    # What jax.tree.flatten gives for these objects: checked before each call of TrainStep (not by fit,
    # which keeps the arrays itself between its sync points).
    self.flat, self.flat_treedef = jax.tree.flatten((model, optimizer), is_leaf=_is_variable) if track else ([], None)

  def place(self) -> None:
    """With many devices, puts the objects' arrays on the mesh as the step expects them (else nothing)."""
    if self.parallel is not None:
      self.parallel.place(self.model, self.optimizer)

  def read(self) -> list[Any]:
    """The arrays the Variables hold now."""
    return [v.get_raw_value() for v in self.variables]

  def write(self, arrays: Sequence[Any]) -> None:
    """Puts ``arrays`` back into the Variables, in place."""
    for variable, value in zip(self.variables, arrays):
      variable.set_raw_value(value)

  def matches(self, model: Any, optimizer: Any) -> bool:
    """Whether ``(model, optimizer)`` are these objects, with the structure and Variables split."""
    if model is not self.model or optimizer is not self.optimizer or self.flat_treedef is None:
      return False
    flat, treedef = jax.tree.flatten((model, optimizer), is_leaf=_is_variable)
    return treedef == self.flat_treedef and all(map(operator.is_, flat, self.flat))


@functools.partial(nnx.jit, static_argnums=(0,))
def _general_step(loss_fn: LossFn, model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch, loss_scale: Any):
  """``update`` under ``nnx.jit``: for objects the flat path cannot take (a step that ``sow``s, refs)."""
  return update(loss_fn, model, optimizer, batch, loss_scale)


@jax.jit
def _stack_metrics(rows: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Stacks per-step metrics on a new leading axis, in one dispatch."""
  return jax.tree.map(lambda *values: jnp.stack(values), *rows)


def _uses_convolution(jaxpr: Any) -> bool:
  """True if ``jaxpr`` or any jaxpr nested in it (pjit, custom_vjp, scan...) holds a convolution."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      return True
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        sub = item if hasattr(item, 'eqns') else getattr(item, 'jaxpr', None)
        if sub is not None and hasattr(sub, 'eqns') and _uses_convolution(sub):
          return True
  return False


def many_mode(spec: StepSpec, arrays: list[Any], batches: Batch, loss_scale: Any) -> str:
  """``'scan'``, or ``'loop'`` on the CPU backend for a step holding a convolution (traced only).

  ``batches`` holds stacked batches; one of them is traced (shapes only).
  """
  if jax.default_backend() != 'cpu':
    return 'scan'
  one = {k: jax.ShapeDtypeStruct(np.shape(v)[1:], v.dtype if hasattr(v, 'dtype') else np.asarray(v).dtype)
         for k, v in batches.items()}
  jaxpr = _step_keeping.trace(arrays, one, loss_scale, spec=spec).jaxpr.jaxpr  # jit's trace cache: once per spec
  return 'loop' if _uses_convolution(jaxpr) else 'scan'


def check_stacked(name: str, batches: Any) -> int:
  """The number ``K`` of stacked batches; raises unless every array is ``(K, batch, ...)``.

  Args:
    name: the argument's name for the message.
    batches: a dict of arrays stacked by :func:`stack_batches`.

  Returns:
    ``K``.
  """
  if not isinstance(batches, Mapping) or not batches:
    raise TypeError(f'{name}: expected a dict of arrays with a leading axis of K batches '
                    f'(see stack_batches), got {describe(batches)}')
  shapes = {key: tuple(np.shape(value)) for key, value in batches.items()}
  flat = [key for key, shape in shapes.items() if len(shape) < 2]
  if flat:
    raise ValueError(
        f'{name}: expected K batches stacked on a new leading axis, each array of shape (K, batch, ...), '
        f'got {name}[{flat[0]!r}] of shape {shapes[flat[0]]}, which has no batch axis per step (a single '
        'batch passed as K steps of one example?); stack whole batches with ft.stack_batches([b1, b2, ...])')
  sizes = {key: shape[0] for key, shape in shapes.items()}
  if len(set(sizes.values())) != 1 or 0 in sizes.values():
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
    raise TypeError(f'batches: expected a non-empty list of batch dicts, got {describe(batches)}'
                    + (f' of length {len(batches)}' if isinstance(batches, Sequence) else ''))
  first = batches[0]
  if not isinstance(first, Mapping):
    raise TypeError(f'batches[0]: expected a dict of arrays, got {describe(first)}')
  dtype_of = lambda value: value.dtype if hasattr(value, 'dtype') else np.asarray(value).dtype
  spec = {key: (np.shape(value), dtype_of(value)) for key, value in first.items()}
  for index, batch in enumerate(batches):
    if not isinstance(batch, Mapping) or set(batch) != set(spec):
      raise ValueError(f'batches[{index}]: expected a dict with keys {sorted(spec)} like batches[0], got '
                       + (f'keys {sorted(batch)}' if isinstance(batch, Mapping) else describe(batch)))
    for key, (shape, dtype) in spec.items():
      got = (np.shape(batch[key]), dtype_of(batch[key]))
      if got != (shape, dtype):
        raise ValueError(f'batches[{index}][{key!r}]: expected shape {shape} and dtype {dtype} like '
                         f'batches[0], got shape {got[0]} and dtype {got[1]}')
  stack = np.stack if all(isinstance(v, np.ndarray) for b in batches for v in b.values()) else jnp.stack
  return {key: stack([batch[key] for batch in batches]) for key in spec}


class TrainStep:
  """The train step that :func:`make_train_step` returns; see there."""

  def __init__(self, loss_fn: LossFn, loss_scale: Any, *, parallel: DataParallel | None = None,
               donate: bool = False):
    self.loss_fn = loss_fn
    self._loss_scale = loss_scale
    self._parallel = parallel
    self.donate = donate
    self._state: TrainState | None = None  # the last (model, optimizer) split
    self._general = False  # that split cannot take the flat path: nnx.jit instead
    self._modes: dict[Any, str] = {}  # many_mode's choice, by spec and batch shapes
    self._orders: dict[tuple[int, int], np.ndarray] = {}  # as_device_batches' identity orders

  @property
  def parallel(self) -> DataParallel | None:
    """The :class:`flaxtrain.DataParallel` this step trains with, or None (one device)."""
    return self._parallel

  @property
  def loss_scale(self) -> Any:
    """The current :class:`flaxtrain.DynamicLossScale`, or None without loss scaling."""
    return self._loss_scale

  @loss_scale.setter
  def loss_scale(self, value: Any) -> None:
    if (self._loss_scale is None) != (value is None):
      raise ValueError('loss_scale: a step made without loss scaling cannot start it later, nor the reverse; '
                       'make a new step with make_train_step(loss_fn, loss_scale=...)')
    if value is not None:
      precision.check_loss_scale(value)
    self._loss_scale = value

  def state(self, model: Any, optimizer: Any = _MISSING, batch: Any = _MISSING) -> TrainState:
    """The :class:`TrainState` of ``(model, optimizer)``: the last one if it still matches, else a new split.

    A new split checks the arguments first; the compiled code is reused when
    the structure was seen before (by any step with this ``loss_fn``).
    """
    state = self._state
    if state is not None and batch is not _MISSING and state.matches(model, optimizer):
      return state
    if batch is _MISSING:
      given = 1 if optimizer is _MISSING else 2
      missing = ('the optimizer and the batch are missing' if given == 1 else
                 'the optimizer is missing' if isinstance(optimizer, Mapping) else 'the batch is missing')
      raise TypeError(f'train_step: expected train_step(model, optimizer, batch), got {given} '
                      f'argument{"s" if given > 1 else ""}; {missing}')
    return self.split(model, optimizer)

  def split(self, model: nnx.Module, optimizer: nnx.Optimizer, *, for_loop: bool = False) -> TrainState:
    """``(model, optimizer)`` checked (:func:`check_model_and_optimizer`) and split afresh.

    With ``parallel``, the arrays are placed on its mesh first. ``for_loop``:
    the state is for a loop that steps on its arrays itself (``fit``): no
    record of the objects' structure for the per-call check of
    ``train_step(model, optimizer, batch)``, and nothing placed until the
    loop calls ``state.place()`` (after its checks of the data).
    """
    state = TrainState(model, optimizer, self.loss_fn, self._parallel, track=not for_loop, place=not for_loop)
    if not for_loop:
      self._state, self._general = state, not state.fast
    return state

  def _batch(self, batch: Batch, steps: int | None = None) -> Any:
    """What the compiled step takes: split over the devices, or gathered by the step itself on one."""
    if self._parallel is not None:
      return self._parallel.shard_batch(batch, stacked=steps is not None)
    return as_device_batches(batch, steps, self._orders)

  def _call(self, state: TrainState, batch: Batch, steps: int | None = None, unroll: Any = 1) -> Any:
    """The compiled step on the state's arrays, written back; None where the flat path cannot run."""
    try:
      new, metrics, loss_scale, _ = compiled_step(self.donate)(
          state.read(), batch, self._loss_scale, spec=state.spec, steps=steps, unroll=unroll)
    except StructureChanged:  # raised while tracing: nothing ran, nothing was donated
      self._general = True
      return None
    state.write(new)
    self._loss_scale = loss_scale
    return metrics

  def _general_call(self, model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> dict[str, jax.Array]:
    metrics, self._loss_scale = _general_step(self.loss_fn, model, optimizer, batch, self._loss_scale)
    return metrics

  def uses_fast_path(self, model: nnx.Module, optimizer: nnx.Optimizer) -> bool:
    """Whether calls with this (model, optimizer) take the flat compiled path (after at least one call)."""
    state = self._state
    return state is not None and not self._general and state.matches(model, optimizer)

  def __call__(self, model: nnx.Module, optimizer: nnx.Optimizer = _MISSING, batch: Batch = _MISSING,
               ) -> dict[str, jax.Array]:
    """One update of ``model`` and ``optimizer`` on ``batch``, in place; returns the metrics."""
    state = self.state(model, optimizer, batch)
    if not self._general:
      metrics = self._call(state, self._batch(batch))
      if metrics is not None:
        return metrics
    if self._parallel is not None:
      batch = self._parallel.shard_batch(batch)
    return self._general_call(model, optimizer, batch)

  def lower(self, model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> Any:
    """The step for these arguments, lowered (``jax.stages.Lowered``); nothing runs.

    ``train_step.lower(model, optimizer, batch).compile().memory_analysis()``
    shows what donation saves: ``alias_size_in_bytes`` is the state the
    outputs write over instead of holding a second copy of.
    """
    state = self.state(model, optimizer, batch)
    if self._general:
      if self._parallel is not None:
        batch = self._parallel.shard_batch(batch)
      return _general_step.lower(self.loss_fn, model, optimizer, batch, self._loss_scale)
    return compiled_step(self.donate).lower(state.read(), self._batch(batch), self._loss_scale, spec=state.spec)

  def many(self, model: nnx.Module, optimizer: nnx.Optimizer, batches: Batch, *,
           mode: Literal['auto', 'scan', 'unroll', 'loop'] = 'auto') -> dict[str, jax.Array]:
    """``K`` updates in one dispatch; ``batches`` holds ``K`` batches stacked on a leading axis.

    Gives what ``K`` calls of ``train_step(model, optimizer, batch)`` give,
    batch by batch, and returns their metrics stacked: each of shape ``(K,)``.
    See :func:`make_train_step` for ``mode`` and the rule ``'auto'`` follows.
    """
    steps = check_stacked('batches', batches)
    if mode not in _MANY_MODES:
      raise ValueError(f'mode: expected one of {_MANY_MODES}, got {mode!r}')
    if self._parallel is not None:
      self._parallel.check_batch(batches, stacked=True, name='batches')
    state = self.state(model, optimizer, batches)
    if mode == 'auto':
      mode = self.many_mode(model, optimizer, batches)
    if not self._general and mode != 'loop':
      metrics = self._call(state, self._batch(batches, steps), steps=steps,
                           unroll=True if mode == 'unroll' else 1)
      if metrics is not None:
        return metrics
    if not self._general:  # 'loop': the compiled single step K times, written back once
      return self._loop(state, batches, steps)
    singles = [{k: v[i] for k, v in batches.items()} for i in range(steps)]
    return _stack_metrics([self(model, optimizer, batch) for batch in singles])

  def _loop(self, state: TrainState, batches: Batch, steps: int) -> dict[str, jax.Array]:
    """``steps`` calls of the compiled single step, carrying the arrays; written back once at the end."""
    on_host = all(isinstance(v, np.ndarray) for v in batches.values())
    singles = [{k: v[i] for k, v in batches.items()} for i in range(steps)] if on_host else \
        _unstack_on_device(dict(batches))
    arrays, rows, loss_scale = state.read(), [], self._loss_scale
    step = compiled_step(self.donate)
    try:
      for batch in singles:
        arrays, metrics, loss_scale, _ = step(arrays, self._batch(batch), loss_scale, spec=state.spec)
        rows.append(metrics)
    finally:  # a step that raised leaves the model at the last good arrays
      if rows:
        state.write(arrays)
        self._loss_scale = loss_scale
    return _stack_metrics(rows)

  def many_mode(self, model: nnx.Module, optimizer: nnx.Optimizer, batches: Batch) -> str:
    """The mode ``many(..., mode='auto')`` uses for these arguments: ``'scan'`` or ``'loop'``."""
    check_stacked('batches', batches)
    state = self.state(model, optimizer, batches)
    key = (state.spec, tuple((k, np.shape(v)[1:], str(getattr(v, 'dtype', ''))) for k, v in sorted(batches.items())))
    if key not in self._modes:
      self._modes[key] = many_mode(state.spec, state.read(), batches, self._loss_scale)
    return self._modes[key]


@jax.jit
def _unstack_on_device(batches: Batch) -> list[dict[str, jax.Array]]:
  steps = len(next(iter(batches.values())))
  return [{key: value[i] for key, value in batches.items()} for i in range(steps)]


def make_train_step(loss_fn: LossFn = classification_loss, *, loss_scale: Any = None,
                    parallel: DataParallel | bool | None = None, donate: bool = False) -> TrainStep:
  """Returns ``train_step(model, optimizer, batch) -> metrics``, compiled.

  The step updates ``model`` and ``optimizer`` in place, so both are current
  after every call, and returns a dict of scalar device arrays: ``loss``,
  ``grad_norm`` (before any clipping), ``learning_rate`` (if the optimizer
  state holds one), the keys of ``aux`` and, with loss scaling,
  ``loss_scale`` and ``grads_finite``.

  How it works: on the first call with a (model, optimizer) pair the step
  splits them once (``nnx.split``) and runs :func:`train_arrays`, one
  ``jax.jit`` function over the flat list of their arrays, compiled once per
  structure and loss function (a second model of the same structure compiles
  nothing). Each call checks with ``jax.tree.flatten`` that the objects still
  have the structure and Variables it split (a replaced submodule,
  ``model.eval()`` or a new optimizer is noticed and split afresh;
  ``nnx.update`` puts new arrays into the same Variables, which the next call
  reads), then writes the new arrays into the Variables with
  ``Variable.set_raw_value``. Where this path cannot apply (Variables that
  are refs or hijax, a step that changes the graph itself such as ``sow``)
  the step falls back to ``nnx.jit`` by itself, with the same results.

  Donation: by default the step keeps the arrays it replaces, so anything
  that shares them stays valid: ``w = model.out.kernel[...]`` taken before a
  step, a model copied with ``nnx.clone`` (which shares the arrays, it does
  not copy them). With ``donate=True`` the replaced arrays are donated to the
  computation, so a step never holds two copies of the parameters and
  optimizer state (what a large model needs), and every array shared with
  them is deleted by the step: copy what you keep (``np.asarray(w)``).
  ``fit`` always donates, to its own copy of the arrays.

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
  (its batch size must be a multiple of the device count) and runs the
  compiled step, told those placements, on all devices at once. The loss and
  gradients are those of the whole (global) batch: the results match one
  device's up to float rounding. ``many`` splits each stacked batch the same way.

  Args:
    loss_fn: ``loss_fn(model, batch) -> (loss, aux)``: a scalar loss and a
      dict of scalar metrics; the model and the batch are arguments, never
      captured, so each call trains on the batch it is given.
    loss_scale: a :class:`flaxtrain.DynamicLossScale` to train with dynamic
      loss scaling (float16): the step differentiates ``loss * scale``,
      unscales the gradients in float32 and, if any is not finite, leaves the
      parameters and the optimizer state unchanged (RNG streams still
      advance) and lowers the scale. The current state is
      ``train_step.loss_scale``. ``loss`` and ``grad_norm`` are unscaled.
    parallel: a :class:`flaxtrain.DataParallel` to train data-parallel on its
      devices, True for ``DataParallel()`` (all devices), or None (the
      default: one device).
    donate: donate the replaced arrays (see above); False by default.

  Returns:
    The step, a callable :class:`TrainStep`. Besides ``many`` and
    ``many_mode``: ``loss_scale`` (the current state), ``lower(model,
    optimizer, batch)`` (the compiled step's ``jax.stages.Lowered``, e.g. for
    ``.compile().memory_analysis()``) and ``uses_fast_path(model, optimizer)``.

  Example:
    >>> train_step = make_train_step()
    >>> metrics = train_step(model, optimizer, batch)                        # doctest: +SKIP
    >>> metrics = train_step.many(model, optimizer, stack_batches(batches))  # doctest: +SKIP
  """
  check_loss_fn(loss_fn)
  if loss_scale is not None:
    precision.check_loss_scale(loss_scale)
  if not isinstance(donate, (bool, np.bool_)):
    raise TypeError(f'donate: expected True or False, got {donate!r}')
  return TrainStep(loss_fn, loss_scale, parallel=as_parallel(parallel), donate=bool(donate))
