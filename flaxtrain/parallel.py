"""Data-parallel training on many devices, with ``jax.sharding``.

A :class:`DataParallel` names a one-axis device mesh (``jax.sharding.Mesh``)
and says where arrays live on it:

* a batch is split along its leading axis over the mesh axis (``'data'``):
  each device holds ``batch_size / num_devices`` rows of one global array;
* parameters and optimizer state are replicated (every device holds a full
  copy), or, with ``params='sharded'``, each large array is split along one
  of its axes (FSDP style: less memory per device, XLA gathers what a step
  needs).

The train step is the same compiled function on one device and on many: it
is told these placements (``in_shardings``/``out_shardings`` of its
``jax.jit``) and XLA inserts the communication. The loss is the mean over the
*global* batch, so 8 devices compute what 1 device computes on the same
batch, up to the order of float additions.

Pass it as ``parallel=`` to :func:`flaxtrain.make_train_step`,
:func:`flaxtrain.make_eval_step`, :func:`flaxtrain.evaluate` and
:func:`flaxtrain.fit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ['DataParallel', 'as_parallel']

_PARAMS_MODES = ('replicated', 'sharded')


class DataParallel:
  """Data-parallel placement of batches, parameters and optimizer state on a mesh.

  Multi-host (several machines, or several processes on one): start the same
  script on every host, and first thing, before any other JAX call::

    jax.distributed.initialize(coordinator_address='10.0.0.1:1234',
                               num_processes=2, process_id=0)  # 1 on the other host

  (on GPU clusters managed by SLURM or on Cloud TPU, ``jax.distributed.initialize()``
  finds these by itself). ``jax.devices()`` then lists the devices of all
  processes and ``DataParallel()`` builds its mesh over all of them. Every
  process must build the same model with the same seed and pass the same
  *global* batch to the step (a :class:`flaxtrain.DataLoader` with the same
  seed does that); each process places only its own devices' rows. Metrics
  come back replicated on every process. Two CPU processes on one machine
  (``gloo`` collectives, the CPU default in JAX 0.10)::

    # train.py
    import sys, jax
    jax.distributed.initialize('localhost:12355', num_processes=2, process_id=int(sys.argv[1]))
    import flaxtrain as ft   # ... then build the model and ft.fit(..., parallel=ft.DataParallel())

    export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2
    python train.py 0 & python train.py 1; wait

  Tested so (tests/test_parallel.py): two CPU processes of two devices each
  train and ``fit`` to one device's results. Not tested: several machines,
  GPUs or TPUs, and checkpoints written by several processes.

  Args:
    devices: the devices to train on; default ``jax.devices()`` (all of them,
      of every process). Not with ``mesh``.
    mesh: a ``jax.sharding.Mesh`` of your own; the batch is split along its
      axis ``axis`` and replicated along any other axis. Not with ``devices``.
    axis: the mesh axis name the batch is split along (``'data'``).
    params: ``'replicated'`` (each device holds all parameters and optimizer
      state) or ``'sharded'`` (each array of at least ``min_shard_size``
      elements is split along its largest axis that ``num_devices`` divides;
      others stay replicated).
    min_shard_size: with ``params='sharded'``, arrays with fewer elements than
      this are replicated (splitting them saves little memory and costs
      communication).

  Example:
    >>> dp = ft.DataParallel()                                   # doctest: +SKIP
    >>> train_step = ft.make_train_step(parallel=dp)             # doctest: +SKIP
    >>> history = ft.fit(model, optimizer, loader, epochs=3, parallel=dp)  # doctest: +SKIP
  """

  def __init__(self, devices: Sequence[Any] | None = None, *, mesh: Mesh | None = None, axis: str = 'data',
               params: Literal['replicated', 'sharded'] = 'replicated', min_shard_size: int = 1024):
    if not isinstance(axis, str) or not axis:
      raise TypeError(f"axis: expected a mesh axis name such as 'data', got {axis!r}")
    if params not in _PARAMS_MODES:
      raise ValueError(f'params: expected one of {_PARAMS_MODES}, got {params!r}')
    if isinstance(min_shard_size, bool) or not isinstance(min_shard_size, (int, np.integer)) or min_shard_size < 0:
      raise ValueError(f'min_shard_size: expected an int >= 0, got {min_shard_size!r}')
    if mesh is not None:
      if devices is not None:
        raise ValueError('devices: pass either devices or mesh, not both (the mesh already names its devices)')
      if not isinstance(mesh, Mesh):
        raise TypeError(f'mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}')
      if axis not in mesh.axis_names:
        raise ValueError(f'axis: {axis!r} is not an axis of mesh, whose axes are {tuple(mesh.axis_names)}')
    else:
      if devices is None:
        devices = jax.devices()
      if isinstance(devices, (str, bytes)) or not isinstance(devices, (Sequence, np.ndarray)):
        raise TypeError(f'devices: expected a list of jax devices (e.g. jax.devices()), got {type(devices).__name__}')
      devices = list(devices)
      if not devices:
        raise ValueError('devices: expected at least one device, got an empty list')
      bad = [d for d in devices if not isinstance(d, jax.Device)]
      if bad:
        raise TypeError(f'devices: expected jax devices (e.g. jax.devices()), got {type(bad[0]).__name__}')
      if len(set(devices)) != len(devices):
        raise ValueError(f'devices: each device may appear once, got {devices}')
      mesh = Mesh(np.array(devices), (axis,))
    self.mesh, self.axis, self.params, self.min_shard_size = mesh, axis, params, int(min_shard_size)
    self.num_devices = int(mesh.shape[axis])
    self.batch_sharding = NamedSharding(mesh, P(axis))
    self.stacked_sharding = NamedSharding(mesh, P(None, axis))  # K stacked batches, for train_step.many
    self.replicated = NamedSharding(mesh, P())
    self._local = self.batch_sharding.is_fully_addressable  # every device belongs to this process

  def __repr__(self) -> str:
    return f'DataParallel(num_devices={self.num_devices}, axis={self.axis!r}, params={self.params!r})'

  def _key(self) -> tuple[Any, ...]:
    return (self.mesh, self.axis, self.params, self.min_shard_size)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, DataParallel) and self._key() == other._key()

  def __hash__(self) -> int:
    return hash(self._key())

  def check_batch(self, batch: Any, *, stacked: bool = False, name: str = 'batch') -> None:
    """Raises unless ``batch`` is a dict of arrays whose batch axis ``num_devices`` divides.

    Args:
      batch: a dict of arrays (NumPy or JAX) sharing one batch size.
      stacked: the arrays hold ``K`` stacked batches: the batch axis is axis 1.
      name: the argument's name for the error message.
    """
    if not isinstance(batch, Mapping) or not batch:
      raise TypeError(f'{name}: expected a non-empty dict of arrays, got {type(batch).__name__}')
    dim = 1 if stacked else 0
    for key, value in batch.items():
      shape = np.shape(value)
      if len(shape) <= dim:
        raise ValueError(f'{name}[{key!r}]: expected an array with a batch axis (axis {dim}) to split '
                         f'over the devices, got shape {tuple(shape)}')
      if shape[dim] % self.num_devices:
        raise ValueError(
            f'{name}[{key!r}]: the global batch size {shape[dim]} is not divisible by the '
            f'{self.num_devices} devices of mesh axis {self.axis!r}; use a batch size that is a multiple '
            f'of {self.num_devices} (e.g. {(shape[dim] // self.num_devices + 1) * self.num_devices}), '
            'also for padded evaluation batches')

  def shard_batch(self, batch: Mapping[str, Any], *, stacked: bool = False) -> dict[str, jax.Array]:
    """``batch`` as global arrays split along the batch axis over the devices.

    NumPy arrays go from the host to the devices in one ``jax.device_put``;
    arrays already placed so are returned as they are.

    Args:
      batch: a dict of arrays, all with the same (global) batch size, which
        must be a multiple of ``num_devices``.
      stacked: ``batch`` holds ``K`` batches stacked on a leading axis (as
        for ``train_step.many``): the split is along axis 1.

    Returns:
      A dict of ``jax.Array`` with sharding ``batch_sharding`` (or
      ``NamedSharding(mesh, P(None, axis))`` when stacked).

    Raises:
      ValueError: the batch size is not divisible by ``num_devices`` (the
        message names both numbers).
    """
    self.check_batch(batch, stacked=stacked)
    return jax.device_put(dict(batch), self.stacked_sharding if stacked else self.batch_sharding)

  def _for_jit(self, batch: Mapping[str, Any], *, stacked: bool = False) -> Mapping[str, Any]:
    """``batch`` checked, ready for a ``jax.jit`` told ``batch_sharding`` (or ``stacked_sharding``).

    Host NumPy arrays are passed on as they are when every device is this
    process's: the jitted call puts them on the devices itself, in C++ (a
    Python ``jax.device_put`` of a dict costs several times a small step).
    Anything else (JAX arrays, or a mesh spanning processes) goes through
    :meth:`shard_batch`.
    """
    self.check_batch(batch, stacked=stacked)
    if self._local and all(type(value) is np.ndarray for value in batch.values()):
      return batch
    return jax.device_put(dict(batch), self.stacked_sharding if stacked else self.batch_sharding)

  def param_sharding(self, array: Any) -> NamedSharding:
    """The placement of a parameter or optimizer-state array of this shape.

    Replicated, or with ``params='sharded'`` split along the array's largest
    axis that ``num_devices`` divides (the first of equal ones), if it has
    at least ``min_shard_size`` elements.
    """
    shape = np.shape(array)
    if self.params == 'replicated' or int(np.prod(shape, dtype=np.int64)) < max(self.min_shard_size, 1):
      return self.replicated
    fits = [d for d in range(len(shape)) if shape[d] % self.num_devices == 0 and shape[d] >= self.num_devices]
    if not fits:
      return self.replicated
    best = max(fits, key=lambda d: (shape[d], -d))
    spec = [None] * len(shape)
    spec[best] = self.axis
    return NamedSharding(self.mesh, P(*spec))

  def _place_arrays(self, arrays: Sequence[Any]) -> list[Any]:
    """``arrays`` moved to their :meth:`param_sharding` (those already there unchanged)."""
    placed = []
    for x in arrays:
      target = self.param_sharding(x)
      current = getattr(x, 'sharding', None)
      if current is None or not current.is_equivalent_to(target, np.ndim(x)):
        x = jax.device_put(x, target)
      placed.append(x)
    return placed

  def place(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None) -> None:
    """Puts the arrays of ``model`` (and ``optimizer``) on the mesh, in place.

    Each array goes to :meth:`param_sharding`: replicated, or split with
    ``params='sharded'``. The Variable objects stay the same; only the
    arrays they hold are replaced. The train step does this by itself on its
    first call; call it yourself to place a model before evaluating it or to
    see the placement.

    Args:
      model: an ``nnx.Module``.
      optimizer: its ``nnx.Optimizer``, or None.
    """
    if not isinstance(model, nnx.Module):
      raise TypeError(f'model: expected an nnx.Module, got {type(model).__name__}')
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f'optimizer: expected an nnx.Optimizer or None, got {type(optimizer).__name__}')
    nodes = (model,) if optimizer is None else (model, optimizer)
    state = nnx.state(nodes)
    leaves, treedef = jax.tree.flatten(state)
    nnx.update(nodes, jax.tree.unflatten(treedef, self._place_arrays(leaves)))


def as_parallel(value: Any, name: str = 'parallel') -> DataParallel | None:
  """``value`` as a DataParallel: None stays None, True means ``DataParallel()``."""
  if value is None or value is False:
    return None
  if value is True:
    return DataParallel()
  if not isinstance(value, DataParallel):
    raise TypeError(f'{name}: expected None, True or a flaxtrain.DataParallel, got {type(value).__name__}')
  return value
