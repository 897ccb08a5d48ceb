"""Exercises of notebook 10 (scaling to many devices): each device's slice, a data-parallel sharding.

Both checks run on one device: the slice is arithmetic, and the sharding is
checked on a one-device mesh by its PartitionSpec and by placing a batch.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, exercise


@exercise('10.1', "the slice of a global batch that one device holds",
          'a function device_slice(global_batch, num_devices, device_index) returning a slice',
          solutions.device_slice)
def check_device_slice(answer):
  for global_batch, num_devices in ((64, 8), (12, 3), (5, 1)):
    covered = []
    for index in range(num_devices):
      got = call(answer, global_batch, num_devices, index)
      expected = solutions.device_slice(global_batch, num_devices, index)
      if not isinstance(got, slice):
        raise Fail(f'device_slice should return a slice(start, stop), got {type(got).__name__}')
      rows = list(range(global_batch))[got]
      if rows != list(range(global_batch))[expected]:
        at = f'for global_batch {global_batch}, num_devices {num_devices}, device_index {index}'
        per = global_batch // num_devices
        if rows == list(range(global_batch))[index::num_devices]:
          raise Fail(f'{at}: your slice is strided (rows {rows[:4]}...); jax places a batch sharded along '
                     f'its first axis in contiguous blocks: rows {expected.start} to {expected.stop - 1}')
        if len(rows) == num_devices and num_devices != per:
          raise Fail(f'{at}: your slice holds {len(rows)} rows, as many as there are devices; each device holds '
                     f'global_batch // num_devices = {per} rows')
        if rows == list(range(global_batch))[expected.start:expected.stop - 1]:
          raise Fail(f'{at}: your slice stops one row early (rows {expected.start} to {expected.stop - 2}): the stop '
                     f'of a slice is exclusive, so slice({expected.start}, {expected.stop}) holds rows '
                     f'{expected.start} to {expected.stop - 1}')
        raise Fail(f'{at}: your slice holds rows {rows[:1] + rows[-1:] if rows else []} (first, last), but it '
                   f'should hold rows {expected.start} to {expected.stop - 1}')
      covered += rows
    if sorted(covered) != list(range(global_batch)):
      raise Fail(f'for global_batch {global_batch} the slices of the {num_devices} devices do not cover the batch '
                 'exactly once')
  for global_batch, num_devices in ((10, 4), (30, 4)):
    try:
      answer(global_batch, num_devices, 0)
    except ValueError as error:
      # each number as a whole number: "4" in "over 4." counts, in "40" or "4.5" it does not
      named = [n for n in (global_batch, num_devices)
               if not re.search(rf'(?<!\d)(?<!\d\.){n}(?!\d)(?!\.\d)', str(error))]
      if named:
        raise Fail(f'for global_batch {global_batch} and num_devices {num_devices} your ValueError says '
                   f'"{error}", which does not name {" and ".join(map(str, named))}: say both numbers, e.g. '
                   f"f'global_batch {{global_batch}} is not divisible by num_devices {{num_devices}}'") from None
    except NotImplementedError:
      raise
    except Exception as error:
      raise Fail(f'for global_batch {global_batch} and {num_devices} devices your function raised '
                 f'{type(error).__name__}; raise a ValueError that says {global_batch} is not divisible by '
                 f'{num_devices}') from error
    else:
      raise Fail(f'for global_batch {global_batch} and {num_devices} devices the batch cannot be split evenly: '
                 'raise a ValueError (naming both numbers) instead of returning a slice')
  return 'contiguous equal blocks that cover the batch, and a clear error when it cannot be split.'


def _mesh_axis_hint(error):
  text = str(error).lower()
  if 'not found in mesh' in text or ('mesh' in text and 'axis' in text):
    return ("the PartitionSpec names the mesh's axes: this mesh has one axis, called 'data' "
            "(mesh.axis_names), so split the batch with PartitionSpec('data')")
  return None


@exercise('10.2', 'a NamedSharding for data parallelism',
          'a function data_parallel_sharding(mesh) returning a jax.sharding.NamedSharding',
          solutions.data_parallel_sharding, on_error=_mesh_axis_hint)
def check_sharding(answer):
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  got = call(answer, mesh)
  if isinstance(got, PartitionSpec):
    raise Fail(f'you returned the PartitionSpec {got} alone; wrap it with the mesh: NamedSharding(mesh, {got})')
  if not isinstance(got, NamedSharding):
    raise Fail(f'data_parallel_sharding should return a NamedSharding(mesh, PartitionSpec(...)), got '
               f'{type(got).__name__}')
  if got.mesh != mesh:
    raise Fail('the sharding should use the mesh it is given')
  spec = tuple(got.spec)
  if spec in ((), (None,)):
    raise Fail(f'your PartitionSpec {got.spec} replicates the batch on every device; split its first axis over '
               "the mesh axis 'data': PartitionSpec('data')")
  if spec[0] != 'data':
    raise Fail(f"your PartitionSpec {got.spec} does not split the first (batch) axis over 'data': the first "
               "entry names the mesh axis for axis 0 of the array, PartitionSpec('data')")
  if any(s is not None for s in spec[1:]):
    raise Fail(f'your PartitionSpec {got.spec} also splits the other axes; data parallelism splits only the batch')
  batch = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  placed = jax.device_put(batch, got)
  np.testing.assert_array_equal(np.asarray(placed), batch)
  return "the batch axis is split over 'data' and every other axis is kept whole."
