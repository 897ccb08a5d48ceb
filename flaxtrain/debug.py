"""Debugging tools for training runs: look inside a step before guessing.

Each tool answers one question that comes up when training goes wrong
(notebook 07 uses them all):

* :func:`grad_norms`: which layer's gradients are vanishing or exploding?
* :func:`find_nonfinite` / :func:`check_finite`: where is the first NaN or
  infinity in a tree of parameters or gradients, and is it NaN or inf?
* :func:`layer_outputs` and :func:`dead_relu_fraction`: how many ReLU units
  never switch on?
* :func:`overfit_one_batch`: can this model and step drive the loss on a
  single batch towards zero at all?
* :func:`count_compilations`: does the step recompile (a ragged last batch,
  a Python number that changes)?
* :func:`throughput`: is the data loader or the step the bottleneck?

Everything checks its arguments before any device work and names the bad
argument in the error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxtrain import checks

__all__ = [
    'grad_norms',
    'NonFinite',
    'find_nonfinite',
    'check_finite',
    'layer_outputs',
    'dead_relu_fraction',
    'OverfitResult',
    'overfit_one_batch',
    'Compilations',
    'count_compilations',
    'Throughput',
    'throughput',
]

Batch = Mapping[str, Any]

# The event JAX records each time it hands a program to the XLA compiler
# (jax/_src/dispatch.py, BACKEND_COMPILE_EVENT in jax 0.10.2).
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


# Paths and leaves ------------------------------------------------------------

def _key_name(key: Any) -> str | None:
  """One entry of a JAX key path as text; None for a Variable's ``.value``."""
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name == 'value' else key.name
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  return str(key).strip('.[]\'"')


def _path(keys: Sequence[Any]) -> str:
  return '/'.join(name for name in map(_key_name, keys) if name is not None)


def _float_leaves(name: str, tree: Any) -> list[tuple[str, jax.Array]]:
  """``(path, leaf)`` for the floating-point array leaves of ``tree``; ValueError if none."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  found = [(_path(keys), leaf) for keys, leaf in leaves
           if hasattr(leaf, 'dtype') and jnp.issubdtype(leaf.dtype, jnp.floating)]
  if not found:
    kinds = sorted({type(leaf).__name__ for _, leaf in leaves}) or ['nothing']
    raise ValueError(
        f'{name}: expected a pytree with at least one floating-point array (e.g. the grads '
        f'from nnx.grad, or nnx.state(model, nnx.Param)), got {type(tree).__name__} holding {kinds}'
    )
  return found


# Gradient norms --------------------------------------------------------------

def grad_norms(grads: Any, *, by: Literal['layer', 'leaf'] = 'layer') -> dict[str, jax.Array]:
  """The L2 norm of the gradients of each layer (or of each array).

  With ``by='layer'`` the arrays of one module (a Linear's ``kernel`` and
  ``bias``) are pooled: the key is the path without its last part, e.g.
  ``'hidden/0'``. With ``by='leaf'`` each array has its own entry, e.g.
  ``'hidden/0/kernel'``. The squares of all entries add up to the square of
  ``optax.tree.norm(grads)``. Works under ``jax.jit``; the values stay on
  the device.

  Args:
    grads: a pytree of gradients, e.g. the ``nnx.State`` from ``nnx.grad``.
      Non-float leaves (RNG counters, keys) are ignored.
    by: ``'layer'`` or ``'leaf'``.

  Returns:
    ``{path: norm}`` as scalar arrays, in the tree's order.

  Example:
    >>> grads = nnx.grad(lambda m: ft.classification_loss(m, batch)[0])(model)  # doctest: +SKIP
    >>> {k: float(v) for k, v in ft.debug.grad_norms(grads).items()}             # doctest: +SKIP
    {'hidden/0': 0.41, 'out': 0.87}
  """
  if by not in ('layer', 'leaf'):
    raise ValueError(f"by: expected 'layer' or 'leaf', got {by!r}")
  groups: dict[str, list[jax.Array]] = {}
  for path, leaf in _float_leaves('grads', grads):
    key = path if by == 'leaf' else (path.rpartition('/')[0] or path)
    groups.setdefault(key, []).append(leaf)
  return {key: optax.tree.norm(leaves) for key, leaves in groups.items()}


# Finite checks ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NonFinite:
  """One array that holds NaN or infinite values.

  Attributes:
    path: where it is in the tree, e.g. ``'hidden/0/kernel'``.
    nan, posinf, neginf: how many of its entries are NaN, +inf and -inf.
    size: how many entries it has.
  """

  path: str
  nan: int
  posinf: int
  neginf: int
  size: int

  def __str__(self) -> str:
    kinds = [f'{n} {what}' for n, what in ((self.nan, 'NaN'), (self.posinf, '+inf'),
                                            (self.neginf, '-inf')) if n]
    return f'{self.path or "<root>"}: {", ".join(kinds)} of {self.size} values'


@jax.jit
def _counts(leaves: list[jax.Array]) -> jax.Array:
  return jnp.array([[jnp.sum(jnp.isnan(x)), jnp.sum(x == jnp.inf), jnp.sum(x == -jnp.inf)]
                    for x in leaves], dtype=jnp.int32).reshape(len(leaves), 3)


def find_nonfinite(tree: Any) -> list[NonFinite]:
  """Every floating-point array in ``tree`` that holds NaN or inf, in tree order.

  The counts come back from the device in one transfer, so call it outside
  jitted code (inside, use ``jnp.isfinite``, ``jax.debug_nans`` or checkify).

  Args:
    tree: parameters, gradients, a batch: any pytree with floating-point
      arrays. Integer leaves and PRNG keys are skipped.

  Returns:
    A list of :class:`NonFinite`, empty when everything is finite.

  Example:
    >>> ft.debug.find_nonfinite({'w': jnp.array([1.0, jnp.nan])})
    [NonFinite(path='w', nan=1, posinf=0, neginf=0, size=2)]
  """
  leaves = _float_leaves('tree', tree)
  counts = np.asarray(_counts([leaf for _, leaf in leaves]))
  return [NonFinite(path, int(c[0]), int(c[1]), int(c[2]), int(np.size(leaf)))
          for (path, leaf), c in zip(leaves, counts) if c.any()]


def check_finite(tree: Any, name: str = 'tree') -> None:
  """Raises FloatingPointError naming the first array in ``tree`` with NaN or inf.

  Args:
    tree: any pytree with floating-point arrays (see :func:`find_nonfinite`).
    name: what ``tree`` is, for the message (``'grads'``, ``'params'``).

  Raises:
    FloatingPointError: e.g. ``grads: first non-finite array is
      hidden/0/kernel: 12 NaN of 1024 values (2 arrays affected)``. The error's
      ``found`` attribute holds the full list of :class:`NonFinite`.

  Example:
    >>> ft.debug.check_finite(grads, 'grads')  # doctest: +SKIP
  """
  if not isinstance(name, str):
    raise TypeError(f'name: expected a str naming the tree, got {name!r}')
  found = find_nonfinite(tree)
  if found:
    error = FloatingPointError(
        f'{name}: first non-finite array is {found[0]} ({len(found)} '
        f'arra{"y" if len(found) == 1 else "ys"} affected: {", ".join(f.path for f in found[:5])}'
        f'{", ..." if len(found) > 5 else ""})'
    )
    error.found = found
    raise error


# Activations and dead units ----------------------------------------------------

def layer_outputs(
    model: nnx.Module,
    x: Any,
    types: type | tuple[type, ...] = (nnx.Linear, nnx.Conv),
) -> dict[str, jax.Array]:
  """Runs ``model(x)`` eagerly and returns the output of every submodule of ``types``.

  A forward hook: while the model runs, the ``__call__`` of each class in
  ``types`` is wrapped so that the instances inside ``model`` record what
  they return; the classes are restored afterwards, even on error. The model
  itself is not changed, and no model code needs to ``sow`` anything. While
  it runs, other threads calling modules of these classes are hooked too
  (their calls are not recorded). For a
  ``Linear`` followed by a ReLU, its output is the ReLU's input (see
  :func:`dead_relu_fraction`).

  Args:
    model: any ``nnx.Module``.
    x: the input to ``model``.
    types: the module classes to record, e.g. ``nnx.Linear``.

  Returns:
    ``{path: output}``, e.g. ``{'hidden/0': ..., 'out': ...}``, in call order.

  Raises:
    ValueError: if ``model`` has no submodule of ``types``, or one of them is
      called more than once in the forward pass (its outputs would be ambiguous).

  Example:
    >>> outputs = ft.debug.layer_outputs(model, batch['image'], nnx.Linear)  # doctest: +SKIP
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  types = types if isinstance(types, tuple) else (types,)
  if not types or not all(isinstance(t, type) and issubclass(t, nnx.Module) for t in types):
    raise TypeError(f'types: expected an nnx.Module subclass or a tuple of them, got {types!r}')
  targets = {id(node): '/'.join(map(str, path)) for path, node in nnx.iter_graph(model)
             if isinstance(node, types) and node is not model}
  if not targets:
    raise ValueError(f'model: expected submodules of type {[t.__name__ for t in types]}, '
                     f'found none in {type(model).__name__}')
  recorded: dict[str, jax.Array] = {}

  def hook(call: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
      out = call(self, *args, **kwargs)
      path = targets.get(id(self))
      if path is not None:
        if path in recorded:
          raise ValueError(f'model: the layer {path!r} is called more than once per forward pass; '
                           'layer_outputs cannot tell its calls apart')
        recorded[path] = out
      return out
    return wrapped

  classes = {type(node) for _, node in nnx.iter_graph(model) if id(node) in targets}
  saved = {cls: cls.__dict__.get('__call__') for cls in classes}
  try:
    for cls in classes:
      cls.__call__ = hook(cls.__call__)
    model(x)
  finally:
    for cls, call in saved.items():
      if call is None:
        del cls.__call__
      else:
        cls.__call__ = call
  return recorded


def dead_relu_fraction(pre_activations: Any) -> float:
  """The fraction of units whose ReLU outputs zero for every example in the batch.

  A unit (a feature of the last axis) is dead on this batch if its input to
  the ReLU is <= 0 for every example and every position: its output and its
  gradient are then zero, so no example can move its weights. Passing the
  ReLU's *output* gives the same answer (it is 0 exactly where the input is <= 0).

  Args:
    pre_activations: array ``(batch, ..., units)``, e.g. a ``Linear`` output
      from :func:`layer_outputs`.

  Returns:
    A float in [0, 1].

  Example:
    >>> ft.debug.dead_relu_fraction(jnp.array([[-1.0, 2.0], [-3.0, 0.0]]))
    0.5
  """
  if not hasattr(pre_activations, 'shape') or jnp.ndim(pre_activations) < 2:
    raise ValueError('pre_activations: expected an array (batch, ..., units) with at least 2 '
                     f'dimensions, got {type(pre_activations).__name__} of shape {np.shape(pre_activations)}')
  checks.check_floating('pre_activations', pre_activations)
  if 0 in jnp.shape(pre_activations):
    raise ValueError(f'pre_activations: expected a non-empty array, got shape {jnp.shape(pre_activations)}')
  x = jnp.asarray(pre_activations)
  alive = jnp.any(x.reshape(-1, x.shape[-1]) > 0, axis=0)
  return float(1.0 - jnp.mean(alive))


# Overfitting one batch -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OverfitResult:
  """What :func:`overfit_one_batch` saw.

  Attributes:
    reached: whether the loss went below ``threshold``.
    steps: updates done (the first step below the threshold ends the run).
    losses: the loss before each update, as float64.
    threshold: the target.
  """

  reached: bool
  steps: int
  losses: np.ndarray
  threshold: float

  @property
  def final_loss(self) -> float:
    """The last loss recorded."""
    return float(self.losses[-1])


def overfit_one_batch(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    batch: Batch,
    *,
    step: Callable[..., Mapping[str, Any]] | None = None,
    max_steps: int = 200,
    threshold: float = 0.01,
) -> OverfitResult:
  """Trains a *copy* of ``model`` on one batch; reports if the loss falls below ``threshold``.

  A model and step that cannot drive the loss on a handful of examples
  towards zero have a bug (wrong labels, a detached loss, a frozen layer, a
  rate far off) that more data will not fix. ``model`` and its RNG state are
  left untouched: the run uses ``nnx.clone(model)`` and a fresh optimizer.

  Args:
    model: the model to test; not modified.
    tx: an optax transformation, e.g. ``optax.adam(1e-2)``.
    batch: one batch, e.g. ``{'image': ..., 'label': ...}``.
    step: ``step(model, optimizer, batch) -> metrics`` returning a dict with
      ``'loss'``; by default :func:`flaxtrain.make_train_step`. The
      ``'loss'`` it reports is the loss before its update.
    max_steps: at most this many updates.
    threshold: the loss to get below.

  Returns:
    An :class:`OverfitResult`.

  Example:
    >>> result = ft.debug.overfit_one_batch(model, optax.adam(1e-2), batch)  # doctest: +SKIP
    >>> result.reached, result.steps                                          # doctest: +SKIP
    (True, 61)
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f'tx: expected an optax.GradientTransformation such as optax.adam(1e-2), '
                    f'got {type(tx).__name__}')
  if not isinstance(batch, Mapping) or not batch:
    raise TypeError(f'batch: expected a non-empty dict of arrays, got {type(batch).__name__}')
  if step is not None and not callable(step):
    raise TypeError(f'step: expected a callable step(model, optimizer, batch) -> metrics, got {step!r}')
  checks.check_int('max_steps', max_steps)
  threshold = checks.check_real('threshold', threshold, expected='a finite number > 0',
                                 valid=lambda v: v > 0)
  if step is None:
    from flaxtrain.steps import make_train_step  # here, to keep debug importable on its own
    step = make_train_step()
  copy = nnx.clone(model)
  optimizer = nnx.Optimizer(copy, tx, wrt=nnx.Param)
  losses = []
  for _ in range(max_steps):
    metrics = step(copy, optimizer, batch)
    if not isinstance(metrics, Mapping) or 'loss' not in metrics:
      raise TypeError(
          "step: expected it to return a dict of metrics with a 'loss' entry, as "
          f'flaxtrain.make_train_step does; got {type(metrics).__name__}'
          + (f' with keys {sorted(metrics)}' if isinstance(metrics, Mapping) else '')
      )
    losses.append(float(metrics['loss']))
    if not math.isfinite(losses[-1]) or losses[-1] < threshold:
      break
  return OverfitResult(reached=losses[-1] < threshold, steps=len(losses),
                       losses=np.array(losses, dtype=np.float64), threshold=threshold)


# Compilations ------------------------------------------------------------------

@dataclasses.dataclass
class Compilations:
  """The XLA compilations seen inside a :func:`count_compilations` block.

  Attributes:
    names: the name of each compiled function in order, e.g.
      ``'jit(train_step)'``; eager operations appear as ``'jit(add)'`` etc.
    seconds: how long each compilation took, in the same order.
  """

  names: list[str] = dataclasses.field(default_factory=list)
  seconds: list[float] = dataclasses.field(default_factory=list)

  @property
  def count(self) -> int:
    """All compilations."""
    return len(self.names)

  def of(self, name: str) -> int:
    """Compilations of functions whose name contains ``name``, e.g. ``'train_step'``."""
    if not isinstance(name, str) or not name:
      raise ValueError(f'name: expected a non-empty str, got {name!r}')
    return sum(name in n for n in self.names)


@contextlib.contextmanager
def count_compilations() -> Iterator[Compilations]:
  """Counts the XLA compilations inside a ``with`` block.

  JAX records an event each time it hands a program to the XLA compiler: a
  jitted function called with new shapes, dtypes or static arguments, and
  every eager operation on new shapes. A step that compiles more than once
  in a training loop is being retraced (a ragged last batch, a Python
  scalar that changes). Calls served from JAX's in-memory cache compile
  nothing and are not counted.

  Yields:
    A :class:`Compilations`, filled in as the block runs.

  Example:
    >>> with ft.debug.count_compilations() as compiled:  # doctest: +SKIP
    ...   for batch in loader:
    ...     train_step(model, optimizer, batch)
    >>> compiled.of('train_step')                        # doctest: +SKIP
    1
  """
  seen = Compilations()

  def listener(event: str, duration: float, **kwargs: Any) -> None:
    if event == _COMPILE_EVENT:
      seen.names.append(str(kwargs.get('fun_name', '?')))
      seen.seconds.append(float(duration))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


# Throughput ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Throughput:
  """Examples per second, each the median over rounds.

  Attributes:
    loader: iterating the loader alone (making batches, no training).
    step: the step alone, on batches made beforehand; None without a step.
    both: loader and step together, as a training loop runs; None without a step.
    rounds: timed rounds per measurement.
  """

  loader: float
  step: float | None
  both: float | None
  rounds: int


def _examples(batch: Any) -> int:
  if isinstance(batch, Mapping) and 'mask' in batch:
    return int(np.sum(batch['mask']))
  leaves = jax.tree.leaves(batch)
  if not leaves or jnp.ndim(leaves[0]) == 0:
    raise ValueError(f'loader: expected batches of arrays with a leading batch axis, got {type(batch).__name__}')
  return int(jnp.shape(leaves[0])[0])


def _stream(loader: Iterable[Any], n: int) -> Iterator[Any]:
  """The first ``n`` batches of a fresh pass, one at a time, starting further passes as needed."""
  given = 0
  while given < n:
    before = given
    for batch in loader:
      yield batch
      given += 1
      if given == n:
        return
    if given == before:
      raise ValueError('loader: expected it to yield batches, got an empty pass')


def throughput(
    loader: Iterable[Any],
    step: Callable[[Any], Any] | None = None,
    *,
    num_batches: int = 20,
    rounds: int = 3,
) -> Throughput:
  """Measures examples/s of the loader alone, the step alone, and both together.

  Each round times ``num_batches`` batches three ways, one after the other
  (so all three see the same machine load): pulling them from ``loader``;
  calling ``step`` on batches pulled beforehand; and pulling and stepping
  together. Step timings wait for the device with ``jax.block_until_ready``.
  One untimed call compiles the step first. Examples are counted from the
  batch's leading axis (or the sum of its ``mask``).

  Args:
    loader: re-iterable batches (a :class:`flaxtrain.DataLoader`, a list);
      each round starts a new pass. A one-shot iterator is refused.
    step: ``step(batch) -> anything``, e.g. ``lambda b: train_step(model,
      optimizer, b)``; it may update a model in place. None measures the loader alone.
    num_batches: batches per timing.
    rounds: timed rounds; the median is reported.

  Returns:
    A :class:`Throughput`.

  Example:
    >>> speed = ft.debug.throughput(loader, lambda b: train_step(model, optimizer, b))  # doctest: +SKIP
    >>> speed.loader / speed.step                                                      # doctest: +SKIP
  """
  if not isinstance(loader, Iterable) or iter(loader) is loader:
    raise TypeError('loader: expected something that can be iterated more than once (a DataLoader '
                    f'or a list of batches), got {type(loader).__name__}')
  if step is not None and not callable(step):
    raise TypeError(f'step: expected a callable step(batch) or None, got {step!r}')
  checks.check_int('num_batches', num_batches)
  checks.check_int('rounds', rounds)
  if step is not None:
    jax.block_until_ready(step(next(_stream(loader, 1))))  # compile outside the timings
  times: dict[str, list[float]] = {'loader': [], 'step': [], 'both': []}
  examples = 0
  for _ in range(rounds):
    start = time.perf_counter()
    batches = list(_stream(loader, num_batches))
    times['loader'].append(time.perf_counter() - start)
    examples = sum(_examples(b) for b in batches)
    if step is None:
      continue
    start = time.perf_counter()
    jax.block_until_ready([step(b) for b in batches])
    times['step'].append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready([step(b) for b in _stream(loader, num_batches)])
    times['both'].append(time.perf_counter() - start)
  rate = {k: examples / statistics.median(v) if v else None for k, v in times.items()}
  return Throughput(loader=rate['loader'], step=rate['step'], both=rate['both'], rounds=rounds)
