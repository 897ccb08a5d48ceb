"""Mixed precision: dynamic loss scaling and small precision diagnostics.

float16 has only 5 exponent bits: gradients smaller than about 6e-8 round to
zero, and values above 65504 become ``inf``. Loss scaling multiplies the loss
by a large factor before differentiation, so that the gradients are computed
in a range float16 can hold, then divides the gradients by the same factor
(in float32) before the optimizer sees them. *Dynamic* loss scaling picks the
factor by itself:

* if any gradient is not finite, the step is skipped, the scale is multiplied
  by ``backoff_factor`` (halved by default, never below ``min_scale``) and the
  count of good steps restarts;
* after ``growth_interval`` consecutive finite steps the scale is multiplied
  by ``growth_factor`` (doubled by default), to use as much of the range as
  possible.

One step with loss scaling, written out::

  def scaled_loss_fn(model, batch):
    loss, aux = loss_fn(model, batch)
    return scale_loss(loss, loss_scale), (loss, aux)

  (_, (loss, aux)), grads = nnx.value_and_grad(scaled_loss_fn, has_aux=True)(model, batch)
  grads = unscale_grads(grads, loss_scale)
  finite = all_finite(grads)
  # apply the update only where ``finite`` is True, then
  loss_scale = adjust_loss_scale(loss_scale, finite)

Every function here is pure and works under ``jax.jit``; the loss scale is a
pytree whose arrays are the state and whose factors are static configuration.
bfloat16 keeps float32's exponent range and needs no loss scaling.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from flaxtrain import checks

__all__ = [
    'DynamicLossScale',
    'dynamic_loss_scale',
    'scale_loss',
    'unscale_grads',
    'all_finite',
    'adjust_loss_scale',
    'check_loss_scale',
    'count_underflow',
    'param_bytes',
]


class DynamicLossScale(struct.PyTreeNode):
  """The state of dynamic loss scaling; build it with :func:`dynamic_loss_scale`.

  Attributes:
    scale: float32 scalar, the factor the loss is multiplied by.
    good_steps: int32 scalar, consecutive finite steps since the scale last
      changed.
    growth_interval: finite steps after which the scale grows (static).
    growth_factor: the factor it grows by (static).
    backoff_factor: the factor it shrinks by after a non-finite step (static).
    min_scale: the scale never shrinks below this (static).
  """

  scale: jax.Array
  good_steps: jax.Array
  growth_interval: int = struct.field(pytree_node=False, default=2000)
  growth_factor: float = struct.field(pytree_node=False, default=2.0)
  backoff_factor: float = struct.field(pytree_node=False, default=0.5)
  min_scale: float = struct.field(pytree_node=False, default=1.0)

  def __post_init__(self) -> None:
    """Checks a scale given as a host number when the state is built by hand.

    Kept to a type test otherwise: the state is rebuilt at every jitted step.
    Everything else is checked at first use, by :func:`check_loss_scale`.
    """
    if type(self.scale) in (int, float):  # pylint: disable=unidiomatic-typecheck
      _check_scale_value(float(self.scale), self.min_scale)


def dynamic_loss_scale(
    initial_scale: float = 2.0**15,
    *,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
) -> DynamicLossScale:
  """A fresh :class:`DynamicLossScale`, with every argument checked.

  Args:
    initial_scale: the first scale, a finite float32 number >= ``min_scale``.
      Powers of two keep scaling and unscaling exact.
    growth_interval: consecutive finite steps before the scale grows (>= 1).
    growth_factor: the factor the scale grows by, > 1.
    backoff_factor: the factor it shrinks by on a non-finite step, in (0, 1).
    min_scale: the smallest scale, > 0.

  Returns:
    A ``DynamicLossScale`` with ``scale = initial_scale`` and ``good_steps = 0``.

  Example:
    >>> loss_scale = dynamic_loss_scale(2.0**10, growth_interval=100)
    >>> float(loss_scale.scale), int(loss_scale.good_steps)
    (1024.0, 0)
  """
  growth_interval = checks.check_int('growth_interval', growth_interval)
  growth_factor = checks.check_real(
      'growth_factor', growth_factor, expected='a finite number > 1', valid=lambda v: v > 1.0)
  backoff_factor = checks.check_real(
      'backoff_factor', backoff_factor, expected='a number in (0, 1)', valid=lambda v: 0.0 < v < 1.0)
  min_scale = checks.check_real(
      'min_scale', min_scale, expected='a finite float32 number > 0', valid=_positive_float32)
  initial_scale = checks.check_real(
      'initial_scale', initial_scale,
      expected=f'a finite float32 number >= min_scale ({min_scale})',
      valid=lambda v: _positive_float32(v) and v >= min_scale)
  return DynamicLossScale(
      scale=jnp.asarray(initial_scale, jnp.float32),
      good_steps=jnp.asarray(0, jnp.int32),
      growth_interval=growth_interval,
      growth_factor=growth_factor,
      backoff_factor=backoff_factor,
      min_scale=min_scale,
  )


def _positive_float32(value: float) -> bool:
  return 0.0 < value <= float(np.finfo(np.float32).max)


def _check_static_fields(loss_scale: DynamicLossScale) -> None:
  checks.check_int('DynamicLossScale.growth_interval', loss_scale.growth_interval)
  checks.check_real('DynamicLossScale.growth_factor', loss_scale.growth_factor,
                     expected='a finite number > 1', valid=lambda v: v > 1.0)
  checks.check_real('DynamicLossScale.backoff_factor', loss_scale.backoff_factor,
                     expected='a number in (0, 1)', valid=lambda v: 0.0 < v < 1.0)
  checks.check_real('DynamicLossScale.min_scale', loss_scale.min_scale,
                     expected='a finite float32 number > 0', valid=_positive_float32)


def _check_scale_value(scale: float, min_scale: float) -> None:
  if not (_positive_float32(scale) and scale >= min_scale):
    raise ValueError(
        f'DynamicLossScale.scale: expected a finite float32 number >= min_scale ({min_scale}), got {scale}; '
        'build the state with ft.dynamic_loss_scale(initial_scale), which checks every field'
    )


def check_loss_scale(loss_scale: Any) -> None:
  """Raises unless ``loss_scale`` is a :class:`DynamicLossScale` with a float32 scalar scale."""
  if not isinstance(loss_scale, DynamicLossScale):
    raise TypeError(
        'loss_scale: expected a DynamicLossScale (from dynamic_loss_scale()), '
        f'got {type(loss_scale).__name__}'
    )
  if jnp.shape(loss_scale.scale) != () or jnp.asarray(loss_scale.scale).dtype != jnp.float32:
    raise ValueError(
        'loss_scale: expected scale to be a float32 scalar, got '
        f'shape {jnp.shape(loss_scale.scale)} dtype {jnp.asarray(loss_scale.scale).dtype}'
    )
  _check_static_fields(loss_scale)
  if not isinstance(loss_scale.scale, jax.core.Tracer):  # a concrete scale: its value too
    _check_scale_value(float(loss_scale.scale), loss_scale.min_scale)


def _check_floating_leaves(name: str, tree: Any) -> list[tuple[Any, Any]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  for path, leaf in leaves:
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f'{name}: expected every leaf to be a floating-point array, got '
          f'{dtype if dtype is not None else type(leaf).__name__} at {jax.tree_util.keystr(path)}'
      )
  return leaves


def scale_loss(loss: jax.Array, loss_scale: DynamicLossScale) -> jax.Array:
  """``loss * loss_scale.scale``: the loss to differentiate under loss scaling.

  The product is taken in at least float32, so a float16 loss cannot
  overflow here; the gradients flowing back into float16 layers are scaled
  by the same factor.

  Args:
    loss: a floating-point scalar.
    loss_scale: from :func:`dynamic_loss_scale`.

  Returns:
    A scalar of dtype ``promote_types(loss.dtype, float32)``.

  Example:
    >>> float(scale_loss(jnp.float32(0.5), dynamic_loss_scale(8.0)))
    4.0
  """
  check_loss_scale(loss_scale)
  checks.check_floating('loss', loss)
  checks.check_shape('loss', loss, (), 'a scalar loss')
  return loss * loss_scale.scale


def unscale_grads(grads: Any, loss_scale: DynamicLossScale) -> Any:
  """Divides every gradient by the scale, in float32, back in its own dtype.

  Args:
    grads: a pytree of floating-point arrays (e.g. an ``nnx.State``), the
      gradients of :func:`scale_loss`'s result.
    loss_scale: the same loss scale the loss was multiplied by.

  Returns:
    A pytree of the same structure and dtypes: ``leaf / scale``, computed in
    ``promote_types(leaf.dtype, float32)`` and cast back to ``leaf.dtype``.

  Example:
    >>> grads = {'w': jnp.array([512.0, 2048.0], jnp.float16)}
    >>> unscale_grads(grads, dynamic_loss_scale(1024.0))['w']
    Array([0.5, 2. ], dtype=float16)
  """
  check_loss_scale(loss_scale)
  _check_floating_leaves('grads', grads)

  def unscale(g: jax.Array) -> jax.Array:
    wide = jnp.promote_types(g.dtype, jnp.float32)
    return (g.astype(wide) / loss_scale.scale.astype(wide)).astype(g.dtype)

  return jax.tree.map(unscale, grads)


def all_finite(tree: Any) -> jax.Array:
  """True when no floating-point leaf of ``tree`` holds a NaN or an infinity.

  Args:
    tree: a pytree of floating-point arrays (an empty tree is finite).

  Returns:
    A scalar boolean array, usable inside ``jax.jit``.

  Example:
    >>> bool(all_finite({'a': jnp.ones(3), 'b': jnp.array([1.0, jnp.inf])}))
    False
  """
  leaves = _check_floating_leaves('tree', tree)
  result = jnp.array(True)
  for _, leaf in leaves:
    result = result & jnp.all(jnp.isfinite(leaf))
  return result


def adjust_loss_scale(loss_scale: DynamicLossScale, grads_finite: jax.Array | bool) -> DynamicLossScale:
  """The loss scale for the next step, given whether this step's gradients were finite.

  * ``grads_finite`` False: ``scale * backoff_factor`` (not below
    ``min_scale``), ``good_steps = 0``.
  * True: ``good_steps + 1``; when that reaches ``growth_interval``, the scale
    is multiplied by ``growth_factor`` (unless the product would overflow
    float32) and ``good_steps`` restarts at 0.

  Args:
    loss_scale: the current state.
    grads_finite: a boolean scalar, e.g. from :func:`all_finite`.

  Returns:
    A new ``DynamicLossScale`` with the same static configuration.

  Example:
    >>> loss_scale = dynamic_loss_scale(1024.0)
    >>> float(adjust_loss_scale(loss_scale, False).scale)
    512.0
  """
  check_loss_scale(loss_scale)
  if jnp.shape(grads_finite) != () or jnp.asarray(grads_finite).dtype != jnp.bool_:
    raise ValueError(
        'grads_finite: expected a boolean scalar (e.g. all_finite(grads)), got '
        f'shape {jnp.shape(grads_finite)} dtype {jnp.asarray(grads_finite).dtype}'
    )
  scale, good_steps = loss_scale.scale, loss_scale.good_steps
  grown_steps = good_steps + 1
  grow = grown_steps >= loss_scale.growth_interval
  grown = scale * loss_scale.growth_factor
  grown = jnp.where(grow & jnp.isfinite(grown), grown, scale)
  shrunk = jnp.maximum(scale * loss_scale.backoff_factor, jnp.float32(loss_scale.min_scale))
  return loss_scale.replace(
      scale=jnp.where(grads_finite, grown, shrunk).astype(jnp.float32),
      good_steps=jnp.where(grads_finite & ~grow, grown_steps, 0).astype(jnp.int32),
  )


def count_underflow(values: Any, reference: Any) -> jax.Array:
  """How many entries are exactly zero in ``values`` but not in ``reference``.

  Compare low-precision gradients with float32 gradients of the same model
  and batch: every entry counted is a gradient that underflowed to zero (or
  was lost to rounding) in low precision.

  Args:
    values: a pytree of floating-point arrays, e.g. float16 gradients.
    reference: a pytree of the same structure and shapes, e.g. float32
      gradients.

  Returns:
    An int32 scalar array.

  Example:
    >>> low = jnp.array([1e-8, 1e-3], jnp.float32).astype(jnp.float16)
    >>> int(count_underflow(low, jnp.array([1e-8, 1e-3])))
    1
  """
  values_leaves = _check_floating_leaves('values', values)
  reference_leaves = _check_floating_leaves('reference', reference)
  if jax.tree.structure(values) != jax.tree.structure(reference):
    raise ValueError(
        'reference: expected the same tree structure as values, got '
        f'{jax.tree.structure(reference)} and {jax.tree.structure(values)}'
    )
  count = jnp.array(0, jnp.int32)
  for (path, v), (_, r) in zip(values_leaves, reference_leaves):
    checks.check_shape(f'reference{jax.tree_util.keystr(path)}', r, jnp.shape(v), 'same as values')
    count = count + jnp.sum((v == 0) & (r != 0), dtype=jnp.int32)
  return count


def param_bytes(model: nnx.Module) -> int:
  """Bytes taken by the ``nnx.Param`` arrays of ``model`` (the weights as stored).

  Args:
    model: an NNX module.

  Returns:
    ``sum(size * itemsize)`` over the parameters, as a Python int; it depends
    on ``param_dtype``, not on the computation ``dtype``.

  Example:
    >>> param_bytes(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))  # (3*2 + 2) float32
    32
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return int(sum(np.dtype(leaf.dtype).itemsize * leaf.size for leaf in leaves))
