"""Runs flaxtrain on several (simulated) CPU devices, for tests/test_parallel.py.

    python tests/_parallel_worker.py checks DEVICES LOAD_DIR SAVE_DIR
    python tests/_parallel_worker.py host PROCESS_ID PORT

Each sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX
is imported (the device count is fixed when the backend starts, so it
cannot change inside the pytest process) and prints its results as one
JSON line starting with ``RESULT ``. The training runs here are also
imported by the tests, to compute the one-device reference in-process.
"""

import json
import os
import sys

HOST_DEVICES = 2  # CPU devices per process in the two-process (multi-host) run
STEPS = 4
BATCH = 64


def _setup(devices):
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  # More simulated devices than cores: XLA's CPU client sizes its thread pool to max(cores, devices), and
  # a collective whose 8 participants do not all get a thread in time aborts the process ("rendezvous
  # ... only 6 of 8 arrived"), as seen on a 2-core machine; a larger pool (PJRT_NPROC) avoided it.
  os.environ.setdefault('PJRT_NPROC', '16')


def model_and_optimizer(seed=0):
  import optax
  from flax import nnx
  import flaxtrain as ft
  model = ft.MLP(64, (32, 32), 10, rngs=nnx.Rngs(seed))
  return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def batches(count=STEPS, batch_size=BATCH):
  import flaxtrain as ft
  return list(ft.DataLoader(ft.load_digits().train, batch_size, seed=0).epoch(0))[:count]


def params(model):
  """The model's parameters as nested lists, keyed by path."""
  import jax
  import numpy as np
  from flax import nnx
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
  return {jax.tree_util.keystr(path): np.asarray(x).tolist() for path, x in flat}


def train_run(parallel=None, *, many=None, loss_scale=None):
  """STEPS steps of Adam on the digits MLP; returns the losses, grad norms and parameters."""
  import flaxtrain as ft
  model, optimizer = model_and_optimizer()
  step = ft.make_train_step(loss_scale=loss_scale, parallel=parallel)
  data = batches()
  if many is None:
    rows = [step(model, optimizer, batch) for batch in data]
    losses = [float(r['loss']) for r in rows]
    norms = [float(r['grad_norm']) for r in rows]
  else:
    metrics = step.many(model, optimizer, ft.stack_batches(data), mode=many)
    losses, norms = [float(x) for x in metrics['loss']], [float(x) for x in metrics['grad_norm']]
  return {'losses': losses, 'grad_norms': norms, 'params': params(model)}, (model, optimizer, step)


def fit_run(parallel=None):
  """A short fit (2 epochs of 8 steps, validation on padded batches); returns the last epoch's row."""
  import numpy as np
  import flaxtrain as ft
  splits = ft.load_digits()
  train = {k: v[:512] for k, v in splits.train.items()}
  model, optimizer = model_and_optimizer()
  history = ft.fit(model, optimizer, ft.DataLoader(train, BATCH, seed=0), epochs=2,
                   val_loader=ft.DataLoader(splits.val, 64, shuffle=False, remainder='pad'),
                   progress=False, steps_per_dispatch=4, parallel=parallel)
  row = {k: float(np.asarray(v)[-1]) for k, v in history.epochs().items()}
  return {'epoch': row, 'params': params(model)}


def error_of(fn):
  try:
    fn()
  except Exception as error:  # pylint: disable=broad-except
    return [type(error).__name__, str(error)]
  return None


def _spec(x, pad):
  """The PartitionSpec, with one entry per axis if ``pad``: P('data',) and P('data', None) are one layout."""
  from jax.sharding import PartitionSpec
  spec = tuple(x.sharding.spec)
  return str(PartitionSpec(*spec, *[None] * (x.ndim - len(spec)))) if spec and pad else str(x.sharding.spec)


def _specs(arrays, pad=True):
  return [[list(x.shape), _spec(x, pad), bool(x.sharding.is_fully_replicated),
           list(x.addressable_shards[0].data.shape), len(x.sharding.device_set)] for x in arrays]


def checks(devices, load_dir, save_dir):
  """Everything the single-host tests assert on, in one process with ``devices`` CPU devices."""
  _setup(devices)
  import jax
  import numpy as np
  from flax import nnx
  import flaxtrain as ft
  out = {'device_count': jax.device_count()}
  dp = ft.DataParallel()
  out['num_devices'] = dp.num_devices
  out['replicated'], (model, optimizer, step) = train_run(dp)
  out['replicated']['fast_path'] = step.uses_fast_path(model, optimizer)
  out['replicated']['state_specs'] = _specs(jax.tree.leaves(nnx.state((model, optimizer))))
  sharded_batch = dp.shard_batch(batches(1)[0])
  out['batch_specs'] = {k: _specs([v], pad=False)[0] for k, v in sharded_batch.items()}
  fsdp = ft.DataParallel(params='sharded', min_shard_size=0)
  out['sharded'], (model, optimizer, _) = train_run(fsdp)
  out['sharded']['param_specs'] = _specs(jax.tree.leaves(nnx.state(model, nnx.Param)))
  out['sharded']['opt_specs'] = _specs(jax.tree.leaves(nnx.state(optimizer)))
  out['default_sharded_specs'] = _specs(
      [jax.device_put(x, ft.DataParallel(params='sharded').param_sharding(x))
       for x in jax.tree.leaves(nnx.state(model, nnx.Param))])
  out['many_scan'] = train_run(dp, many='scan')[0]
  out['many_loop'] = train_run(fsdp, many='loop')[0]
  out['loss_scale'] = train_run(dp, loss_scale=ft.dynamic_loss_scale(2.0 ** 10))[0]
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(devices // 2, 2), ('data', 'model'))
  user = ft.DataParallel(mesh=mesh, axis='data')
  out['user_mesh'] = train_run(user)[0]
  out['user_mesh']['num_devices'] = user.num_devices
  out['half'] = train_run(ft.DataParallel(devices=jax.devices()[:devices // 2]))[0]
  out['fit'] = fit_run(True)
  # Evaluation on padded batches: every batch split over the devices.
  splits = ft.load_digits()
  val = ft.DataLoader(splits.val, 64, shuffle=False, remainder='pad')
  model, _ = model_and_optimizer()
  out['evaluate'] = ft.evaluate(ft.make_eval_step(parallel=dp), model, val.epoch(0))
  out['evaluate_arg'] = ft.evaluate(ft.make_eval_step(), model, val.epoch(0), parallel=dp)
  # Errors.
  odd = batches(1, batch_size=100)[0]
  model, optimizer = model_and_optimizer()
  odd_stack = ft.stack_batches([odd, odd])
  out['errors'] = {
      'shard_batch': error_of(lambda: dp.shard_batch(odd)),
      'step': error_of(lambda: ft.make_train_step(parallel=dp)(model, optimizer, odd)),
      'many': error_of(lambda: ft.make_train_step(parallel=dp).many(model, optimizer, odd_stack)),
      'eval_step': error_of(lambda: ft.make_eval_step(parallel=dp)(model, odd)),
      'fit': error_of(lambda: ft.fit(model, optimizer, ft.DataLoader(splits.train, 100), epochs=1,
                                     progress=False, parallel=dp)),
      'fit_val': error_of(lambda: ft.fit(model, optimizer, ft.DataLoader(splits.train, 64), epochs=1,
                                         val_loader=ft.DataLoader(splits.val, 100, shuffle=False,
                                                                  remainder='pad'),
                                         progress=False, parallel=dp)),
      'devices_empty': error_of(lambda: ft.DataParallel(devices=[])),
      'devices_type': error_of(lambda: ft.DataParallel(devices=['cpu:0'])),
      'params_mode': error_of(lambda: ft.DataParallel(params='fsdp')),
      'axis': error_of(lambda: ft.DataParallel(mesh=mesh, axis='batch')),
      'mesh_and_devices': error_of(lambda: ft.DataParallel(devices=jax.devices(), mesh=mesh)),
      'parallel_type': error_of(lambda: ft.make_train_step(parallel='data')),
  }
  out['untouched_after_errors'] = params(model) == params(model_and_optimizer()[0])
  # Checkpoints: restore one written on 1 device onto a sharded placement here; write one from here.
  model, optimizer = model_and_optimizer(seed=1)
  fsdp.place(model, optimizer)
  ft.restore_checkpoint(load_dir, model, optimizer)
  out['restored'] = {'params': params(model), 'step': int(optimizer.step[...]),
                     'param_specs': _specs(jax.tree.leaves(nnx.state(model, nnx.Param))),
                     'opt_specs': _specs(jax.tree.leaves(nnx.state(optimizer)))}
  model, optimizer, _ = train_run(fsdp)[1]
  ft.Checkpoints(save_dir).save(STEPS, model, optimizer)
  out['saved'] = state_lists((model, optimizer))
  return out


def state_lists(nodes):
  """Every array of the state of ``nodes`` as nested lists (PRNG keys as their key data)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(nodes)))
  return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x).tolist()
          for x in leaves]


def host(process_id, port):
  """One of two processes of a multi-host run on localhost (HOST_DEVICES CPU devices each)."""
  _setup(HOST_DEVICES)
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2, process_id=process_id)
  import flaxtrain as ft
  dp = ft.DataParallel()
  out = {'process_index': jax.process_index(), 'device_count': jax.device_count(),
         'local_device_count': jax.local_device_count(), 'num_devices': dp.num_devices}
  result, (model, _, _) = train_run(dp)
  out['losses'], out['grad_norms'] = result['losses'], result['grad_norms']
  # Parameters are replicated: each process reads its own full copy.
  out['params'] = result['params']
  out['fit'] = fit_run(dp)['epoch']
  return out


if __name__ == '__main__':
  job = sys.argv[1]
  if job == 'checks':
    result = checks(int(sys.argv[2]), sys.argv[3], sys.argv[4])
  elif job == 'host':
    result = host(int(sys.argv[2]), int(sys.argv[3]))
  else:
    raise SystemExit(f'unknown job {job!r}')
  print('RESULT ' + json.dumps(result), flush=True)
