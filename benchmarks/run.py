"""How fast is a flaxtrain train step, against the plain JAX a reader could write?

    python benchmarks/run.py            # full run, checks the targets (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # a smoke run: few steps, targets reported but not enforced
    python benchmarks/run.py --out results.json

Every variant runs the same Adam update (loss, gradient norm and accuracy
returned as metrics) on the same batches of ``ft.load_digits``, on three
workloads: a tiny MLP 64-32-32-10 (batch 32), an MLP 64-256-256-10 (batch 128)
and ``ft.CNN`` (batch 64). The variants (see benchmarks/README.md):

* ``pure_jax``: the floor. A params pytree (plain nested dicts of arrays) and
  an optax state, updated by a ``jax.jit`` function that donates both.
* ``split_merge``: ``nnx.split((model, optimizer))`` once; ``jax.jit`` over the
  state with ``nnx.merge`` inside the traced function (the model objects are
  updated only when the user calls ``nnx.update``).
* ``nnx_jit``: the same step under a default ``@nnx.jit``, called as
  ``step(model, optimizer, batch)``.
* ``cached_partial``: that step bound once with ``nnx.cached_partial``.
* ``outline_loop``: the outline's loop, in the current API: an ``@nnx.jit``
  step that builds its ``nnx.value_and_grad`` inside, returns ``(loss, aux)``,
  and a loop that appends both to lists.
* ``flaxtrain_step``: ``ft.make_train_step()`` called as
  ``step(model, optimizer, batch)``.
* ``flaxtrain_many``: ``step.many(model, optimizer, batches)`` over K stacked
  batches per call; the time is per step (per call / K).
* ``pure_float_loss`` and ``flaxtrain_float_loss``: ``pure_jax`` and
  ``flaxtrain_step`` with a ``float(metrics['loss'])`` after every step.
* ``pure_loop``, ``fit`` and ``fit_many``: a whole run of epochs over the
  same ``ft.DataLoader``: a hand-written loop around the ``pure_jax`` step
  that keeps the losses and reads them at the end of each epoch, against
  ``ft.fit`` (its logging, NaN checks and progress bar included; no
  validation, no checkpoints), with its default single steps and with
  ``steps_per_dispatch=K``.

Method: each variant starts from the same initial model and first trains K
steps on the first K batches; that warm-up compiles (its first call is
reported as compile time) and its losses must match ``pure_jax``'s within a
float tolerance, or the run fails. Then the variants are timed in interleaved
rounds (the order rotating each round), each round a fixed number of steps
ended by ``jax.block_until_ready``; a time is the median over rounds, and a
ratio is the median over rounds of the ratio of two variants' times in the
same round. Only ratios within one run are compared with the targets, since
the machine is shared and absolute times drift. The exit status is 1 when a target is
missed (in a full run) or when a variant disagrees with ``pure_jax``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jaxlib
import numpy as np
import optax
from flax import nnx

import flaxtrain as ft

SCHEMA = 1
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / 'results' / 'latest.json'
LEARNING_RATE = 1e-3
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5  # losses of every variant against pure_jax, step by step


@dataclasses.dataclass(frozen=True)
class Workload:
  """A model, its batch size, how many steps ``.many`` takes per call, and how long to time."""
  description: str
  make_model: Callable[[], nnx.Module]
  batch_size: int
  many_k: int  # K: steps per .many call (and warm-up steps of every variant)
  steps_per_round: int  # a multiple of many_k
  fit_epochs: int  # epochs per fit / pure_loop call


WORKLOADS = {
    'tiny_mlp': Workload('ft.MLP(64, (32, 32), 10), batch 32',
                         lambda: ft.MLP(64, (32, 32), 10, rngs=nnx.Rngs(0)), 32, 32, 160, 4),
    'mlp': Workload('ft.MLP(64, (256, 256), 10), batch 128',
                    lambda: ft.MLP(64, (256, 256), 10, rngs=nnx.Rngs(0)), 128, 8, 48, 8),
    'cnn': Workload('ft.CNN(), batch 64', lambda: ft.CNN(rngs=nnx.Rngs(0)), 64, 16, 16, 2),
}
ROUNDS, QUICK_ROUNDS = 15, 2  # a quick run: K steps per round, one epoch per fit call


# "Never slower" where many() runs the very computation of single steps: on the CPU backend
# mode='auto' runs ft.CNN as a loop of the compiled single step (XLA's CPU convolutions are much slower
# inside a scan), so many/single is 1.00x by construction, give or take the noise. The issue sets no
# number for "never slower"; it is checked with the 1.05x band the issue uses for "as fast as" (the
# step targets on the MLP and the CNN), not with 1.00x, which a tie misses half the time.
SAME_SPEED = {'cnn': 1.05}

# Targets: (name, workload, numerator, denominator, op, limit, what it checks). The measured value is
# time(numerator) / time(denominator) per step, both from the same run.
TARGETS = [
    ('step_vs_pure', 'tiny_mlp', 'flaxtrain_step', 'pure_jax', '<=', 1.00,
     'flaxtrain step <= 1.00x the pure JAX step'),
    ('step_vs_pure', 'mlp', 'flaxtrain_step', 'pure_jax', '<=', 1.05,
     'flaxtrain step <= 1.05x the pure JAX step'),
    ('step_vs_pure', 'cnn', 'flaxtrain_step', 'pure_jax', '<=', 1.05,
     'flaxtrain step <= 1.05x the pure JAX step'),
    ('fit_vs_pure_loop', 'tiny_mlp', 'fit', 'pure_loop', '<=', 1.05,
     'ft.fit epochs <= 1.05x a hand-written pure JAX loop over the same DataLoader'),
    ('many_speedup_vs_pure', 'tiny_mlp', 'pure_jax', 'flaxtrain_many', '>=', 4.0,
     'many steps per dispatch >= 4x faster per step than the pure JAX single step'),
    ('many_speedup_vs_outline', 'tiny_mlp', 'outline_loop', 'flaxtrain_many', '>=', 25.0,
     "many steps per dispatch >= 25x faster per step than the outline's nnx.jit loop"),
    *[('many_vs_single', name, 'flaxtrain_many', 'flaxtrain_step', '<=', SAME_SPEED.get(name, 1.00),
       'turning many steps on never makes training slower (per step, <= single steps'
       + (', within the 1.05x noise band: auto runs single steps here)' if name in SAME_SPEED else ')'))
      for name in WORKLOADS],
]


# ----------------------------------------------------------------------------------------------
# The variants. Each factory gets a fresh model and the workload's batches and returns a Runner.


@dataclasses.dataclass
class Runner:
  """One variant, ready to be called: ``run(inputs[i])`` does ``steps_per_call`` steps."""
  run: Callable[[Any], Any]
  inputs: list[Any]
  steps_per_call: int
  losses: Callable[[Any], np.ndarray]  # the per-step losses of one call's output


def _metrics_of_step(loss, aux, grads) -> dict[str, jax.Array]:
  return {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}


def _single(run: Callable, data: 'Data') -> Runner:
  return Runner(run, data.batches, 1, lambda m: np.atleast_1d(np.asarray(m['loss'])))


def make_pure_step(model: nnx.Module, tx: optax.GradientTransformation, *, donate: bool = True):
  """The floor: ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` under ``jax.jit``.

  The parameters travel as plain nested dicts; ``nnx.merge`` only runs while tracing, to apply
  the model's layers, so it costs nothing per call.
  """
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError('the pure JAX floor is written for models whose only state is nnx.Param')
  params = nnx.to_pure_dict(state)
  state_def = jax.tree.structure(state)

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, jax.tree.unflatten(state_def, jax.tree.leaves(params)), rest)
    return ft.classification_loss(model, batch)

  def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, _metrics_of_step(loss, aux, grads)

  jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  return jitted, params, tx.init(params)


def pure_jax(model, tx, data, *, read_loss: bool = False) -> Runner:
  step, params, opt_state = make_pure_step(model, tx)
  box = [params, opt_state]

  def run(batch):
    box[0], box[1], metrics = step(box[0], box[1], batch)
    if read_loss:
      float(metrics['loss'])
    return metrics

  return _single(run, data)


def split_merge(model, tx, data) -> Runner:
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    (loss, aux), grads = nnx.value_and_grad(ft.classification_loss, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), _metrics_of_step(loss, aux, grads)

  box = [state]

  def run(batch):
    box[0], metrics = step(box[0], batch)
    return metrics

  return _single(run, data)


def make_nnx_jit_step() -> Callable:
  """The same step as pure_jax's, on NNX objects, under a default ``@nnx.jit``."""
  @nnx.jit
  def step(model, optimizer, batch):
    (loss, aux), grads = nnx.value_and_grad(ft.classification_loss, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return _metrics_of_step(loss, aux, grads)

  return step


def nnx_jit(model, tx, data) -> Runner:
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = make_nnx_jit_step()
  return _single(lambda batch: step(model, optimizer, batch), data)


def cached_partial(model, tx, data) -> Runner:
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return _single(nnx.cached_partial(make_nnx_jit_step(), model, optimizer), data)


def outline_loop(model, tx, data) -> Runner:
  """The outline's training loop, written with the current API."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    grad_fn = nnx.value_and_grad(ft.classification_loss, has_aux=True)
    (loss, aux), grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    return loss, aux

  train_losses, train_accs = [], []

  def run(batch):
    loss, aux = train_step(model, optimizer, batch)
    train_losses.append(loss)
    train_accs.append(aux['accuracy'])
    if len(train_losses) > 1000:  # the outline keeps one epoch; don't grow without bound here
      train_losses.clear()
      train_accs.clear()
    return {'loss': loss, **aux}

  return _single(run, data)


def flaxtrain_step(model, tx, data, *, read_loss: bool = False) -> Runner:
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = ft.make_train_step()

  def run(batch):
    metrics = step(model, optimizer, batch)
    if read_loss:
      float(metrics['loss'])
    return metrics

  return _single(run, data)


def flaxtrain_many(model, tx, data) -> Runner:
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = ft.make_train_step()
  return Runner(lambda batches: step.many(model, optimizer, batches), data.stacks, data.many_k,
                lambda m: np.asarray(m['loss']))


def pure_loop(model, tx, data, epochs: int) -> Runner:
  """A hand-written loop over the DataLoader around the pure_jax step; one call = ``epochs`` epochs."""
  step, params, opt_state = make_pure_step(model, tx)
  box = [params, opt_state]

  def run(_):
    losses = []
    for epoch in range(epochs):
      epoch_losses = []
      for batch in data.loader.epoch(epoch):
        box[0], box[1], metrics = step(box[0], box[1], batch)
        epoch_losses.append(metrics['loss'])
      epoch_losses = jax.device_get(epoch_losses)  # the one sync per epoch
      if not np.all(np.isfinite(epoch_losses)):
        raise FloatingPointError(f'non-finite loss in epoch {epoch}')
      losses.extend(epoch_losses)
    return np.asarray(losses)

  return Runner(run, [None], epochs * len(data.loader), lambda losses: losses)


def fit(model, tx, data, epochs: int, *, many: bool = False) -> Runner:
  """``ft.fit`` for ``epochs`` epochs (progress bar on, written to /dev/null); no validation.

  With ``many``, ``steps_per_dispatch`` is the workload's K; otherwise fit's default (1).
  """
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  steps_per_dispatch = data.many_k if many else 1

  def run(_):
    with open(os.devnull, 'w') as sink, contextlib.redirect_stderr(sink):
      history = ft.fit(model, optimizer, data.loader, epochs=epochs, progress=True,
                       steps_per_dispatch=steps_per_dispatch)
    return np.asarray(history.steps()['loss'])

  return Runner(run, [None], epochs * len(data.loader), lambda losses: losses)


STEP_VARIANTS = {
    'pure_jax': pure_jax,
    'split_merge': split_merge,
    'nnx_jit': nnx_jit,
    'cached_partial': cached_partial,
    'outline_loop': outline_loop,
    'flaxtrain_step': flaxtrain_step,
    'flaxtrain_many': flaxtrain_many,
    'pure_float_loss': functools.partial(pure_jax, read_loss=True),
    'flaxtrain_float_loss': functools.partial(flaxtrain_step, read_loss=True),
}
LOOP_VARIANTS = {'pure_loop': pure_loop, 'fit': fit, 'fit_many': functools.partial(fit, many=True)}
VARIANTS = [*STEP_VARIANTS, *LOOP_VARIANTS]


# ----------------------------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass
class Data:
  loader: ft.DataLoader
  batches: list[dict[str, jax.Array]]  # epoch 0, on the device
  stacks: list[dict[str, jax.Array]]  # the same batches, K at a time
  many_k: int


def load_data(workload: Workload) -> Data:
  splits = ft.load_digits(seed=0)
  loader = ft.DataLoader(splits.train, workload.batch_size, seed=0)
  host = list(loader.epoch(0))
  k = workload.many_k
  if len(host) < k:
    raise ValueError(f'{workload.description}: {len(host)} batches per epoch, fewer than K={k}')
  stacks = [ft.stack_batches(host[i:i + k]) for i in range(0, len(host) - k + 1, k)]
  return Data(loader, [jax.device_put(b) for b in host], [jax.device_put(s) for s in stacks], k)


def timed_calls(runner: Runner, calls: int, start: int = 0) -> float:
  """Seconds for ``calls`` calls, cycling over the runner's inputs, up to block_until_ready."""
  out = None
  begin = time.perf_counter()
  for i in range(start, start + calls):
    out = runner.run(runner.inputs[i % len(runner.inputs)])
  jax.block_until_ready(out)
  return time.perf_counter() - begin


def warm_up(runner: Runner, steps: int) -> tuple[float, np.ndarray]:
  """Runs the first ``steps`` steps: returns the first call's seconds (compile) and the losses."""
  losses = []
  calls = -(-steps // runner.steps_per_call)
  begin = time.perf_counter()
  for i in range(calls):
    out = jax.block_until_ready(runner.run(runner.inputs[i % len(runner.inputs)]))
    if i == 0:
      first_call = time.perf_counter() - begin
    losses.append(runner.losses(out))
  return first_call, np.concatenate(losses)


def measure(names: list[str], make: Callable[[str], Runner], warmup_steps: int, steps: int,
            rounds: int) -> dict[str, Any]:
  """Builds, checks and times variants side by side; returns per-variant results.

  The first name is the reference: every other variant's warm-up losses must match its own.
  """
  runners, results, reference = {}, {}, None
  for name in names:
    runners[name] = runner = make(name)
    if steps % runner.steps_per_call:
      raise ValueError(f'{name}: {steps} steps per round is not a multiple of {runner.steps_per_call}')
    first_call, losses = warm_up(runner, max(warmup_steps, runner.steps_per_call))
    if reference is None:
      reference = losses
    n = min(len(losses), len(reference))
    results[name] = {
        'first_call_s': first_call,
        'checked_steps': n,
        'max_loss_diff': float(np.max(np.abs(losses[:n] - reference[:n]))),
        'loss_agrees': bool(np.allclose(losses[:n], reference[:n], rtol=LOSS_RTOL, atol=LOSS_ATOL)),
    }
  samples = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:  # rotate the order, so that no variant always goes first
      runner = runners[name]
      calls = steps // runner.steps_per_call
      samples[name].append(timed_calls(runner, calls, start=r * calls) / steps)
  for name in names:
    seconds = float(np.median(samples[name]))
    results[name].update({'us_per_step': seconds * 1e6, 'steps_per_s': 1.0 / seconds,
                          'min_us_per_step': min(samples[name]) * 1e6,
                          'rounds_us_per_step': [s * 1e6 for s in samples[name]]})
  return results


# ----------------------------------------------------------------------------------------------
# Donation: what the compiled step holds in memory


def _memory(compiled: Any) -> dict[str, int]:
  stats = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'peak_memory_in_bytes')
  return {name.replace('_in_bytes', '_bytes'): int(getattr(stats, name)) for name in fields}


def donation(workload: Workload, data: Data) -> dict[str, Any]:
  """Memory of the compiled pure step with and without donation, of nnx.jit's, and of flaxtrain's."""
  tx, batch = optax.adam(LEARNING_RATE), data.batches[0]
  report = {}
  for donate in (True, False):
    step, params, opt_state = make_pure_step(workload.make_model(), tx, donate=donate)
    report['pure_jax' if donate else 'pure_jax_not_donated'] = _memory(
        step.lower(params, opt_state, batch).compile())
  report['state_bytes'] = int(sum(x.nbytes for x in jax.tree.leaves((params, opt_state))))
  model = workload.make_model()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  report['nnx_jit'] = _memory(make_nnx_jit_step().lower(model, optimizer, batch).compile())
  step = ft.make_train_step()
  lower = getattr(step, 'lower', None)  # the compiled fast path, where the step exposes it
  report['flaxtrain_step'] = _memory(lower(model, optimizer, batch).compile()) if lower else None
  return report


# ----------------------------------------------------------------------------------------------
# Running everything


def versions() -> dict[str, Any]:
  device = jax.devices()[0]
  return {
      'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
      'flax': flax.__version__, 'optax': optax.__version__, 'flaxtrain': ft.__version__,
      'backend': jax.default_backend(), 'device_kind': device.device_kind,
      'device_count': jax.device_count(), 'cpu_count': os.cpu_count(), 'machine': platform.machine(),
      'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
  }


def run_workload(name: str, workload: Workload, rounds: int, quick: bool) -> dict[str, Any]:
  data = load_data(workload)
  k = workload.many_k
  steps = k if quick else workload.steps_per_round

  def make_step_variant(variant: str) -> Runner:
    return STEP_VARIANTS[variant](workload.make_model(), optax.adam(LEARNING_RATE), data)

  variants = measure(list(STEP_VARIANTS), make_step_variant, k, steps, rounds)
  epochs = 1 if quick else workload.fit_epochs

  def make_loop_variant(variant: str) -> Runner:
    return LOOP_VARIANTS[variant](workload.make_model(), optax.adam(LEARNING_RATE), data, epochs)

  loops = measure(list(LOOP_VARIANTS), make_loop_variant, 0, epochs * len(data.loader), rounds)
  for results, reference in ((variants, variants['pure_jax']), (loops, loops['pure_loop'])):
    for result in results.values():
      result['ratio'] = paired_ratio(result, reference)
  for name in ('fit', 'fit_many'):
    loops[name]['ratio_to'] = 'pure_loop'
  return {
      'description': workload.description, 'batch_size': workload.batch_size, 'many_k': k,
      'steps_per_round': steps, 'fit_epochs_per_call': epochs,
      'steps_per_epoch': len(data.loader),
      'variants': {**variants, **loops},
      'float_loss_cost': {
          'pure_jax': paired_ratio(variants['pure_float_loss'], variants['pure_jax']),
          'flaxtrain_step': paired_ratio(variants['flaxtrain_float_loss'], variants['flaxtrain_step']),
      },
      'donation': donation(workload, data),
  }


def paired_ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
  """Median over rounds of the per-round ratio of times per step.

  The two variants of one round ran next to each other, so their ratio is
  free of the drift in machine load between rounds. Falls back to the ratio
  of the medians when per-round times are missing.
  """
  a, b = numerator.get('rounds_us_per_step'), denominator.get('rounds_us_per_step')
  if a and b and len(a) == len(b):
    return float(np.median(np.asarray(a) / np.asarray(b)))
  return numerator['us_per_step'] / denominator['us_per_step']


def check_targets(workloads: dict[str, Any]) -> list[dict[str, Any]]:
  """Each target of a workload that was run, with its measured ratio and whether it was met."""
  checked = []
  for name, workload, numerator, denominator, op, limit, what in TARGETS:
    if workload not in workloads:
      continue
    variants = workloads[workload]['variants']
    value = paired_ratio(variants[numerator], variants[denominator])
    met = value <= limit if op == '<=' else value >= limit
    checked.append({'name': name, 'workload': workload, 'measured': value, 'op': op, 'limit': limit,
                    'met': bool(met), 'what': what,
                    'formula': f'{numerator} / {denominator}: median over rounds of the ratio of times per step'})
  return checked


def print_workload(name: str, result: dict[str, Any]) -> None:
  print(f"\n{name}: {result['description']}; K={result['many_k']} steps per .many call")
  print(f"  {'variant':22s} {'us/step':>9s} {'steps/s':>9s} {'ratio':>7s}  {'compile s':>9s}  loss check")
  for variant, r in result['variants'].items():
    against = r.get('ratio_to', 'pure_jax')
    check = 'ok' if r['loss_agrees'] else f"DIFFERS by {r['max_loss_diff']:.2e}"
    print(f"  {variant:22s} {r['us_per_step']:9.1f} {r['steps_per_s']:9.0f} {r['ratio']:6.2f}x"
          f"  {r['first_call_s']:9.2f}  {check}" + ('' if against == 'pure_jax' else f'  (vs {against})'))
  cost = result['float_loss_cost']
  print('  float(loss) after every step costs ' + ', '.join(f'{v:.2f}x ({k})' for k, v in cost.items()))
  d = result['donation']
  print(f"  donation: parameters + Adam state {d['state_bytes']} bytes; peak bytes of the compiled step: "
        f"pure donated {d['pure_jax']['peak_memory_bytes']} (aliased {d['pure_jax']['alias_size_bytes']}), "
        f"pure not donated {d['pure_jax_not_donated']['peak_memory_bytes']}, "
        f"nnx.jit {d['nnx_jit']['peak_memory_bytes']} (aliased {d['nnx_jit']['alias_size_bytes']}), "
        + (f"flaxtrain {d['flaxtrain_step']['peak_memory_bytes']} "
           f"(aliased {d['flaxtrain_step']['alias_size_bytes']})" if d['flaxtrain_step'] else
           'flaxtrain: the step exposes no lower()'))


def markdown_table(results: dict[str, Any]) -> str:
  """The README's results tables, from the JSON a run wrote."""
  v = results['versions']
  lines = [f"Run of {results['date'][:10]} ({'quick' if results['quick'] else 'full'}, {results['rounds']} rounds, "
           f"{results['seconds']:.0f} s): {v['machine']}, {v['cpu_count']} CPU cores, JAX {v['backend']} backend; "
           f"jax {v['jax']}, flax {v['flax']}, optax {v['optax']}; load average at the start "
           f"{', '.join(f'{x:.1f}' for x in v['load_average'] or [])}.", '',
           '| workload | variant | µs/step | steps/s | ratio | compile s |', '|---|---|---|---|---|---|']
  for name, w in results['workloads'].items():
    for i, (variant, r) in enumerate(w['variants'].items()):
      against = '' if r.get('ratio_to', 'pure_jax') == 'pure_jax' else f" (vs `{r['ratio_to']}`)"
      lines.append(f"| {name if i == 0 else ''} | `{variant}` | {r['us_per_step']:.1f} | {r['steps_per_s']:.0f} | "
                   f"{r['ratio']:.2f}x{against} | {r['first_call_s']:.2f} |")
  lines += ['', '| target | workload | measured | limit | met |', '|---|---|---|---|---|']
  for t in results['targets']:
    lines.append(f"| {t['what']} | {t['workload']} | {t['measured']:.3f}x | {t['op']} {t['limit']:.2f}x | "
                 f"{'yes' if t['met'] else '**no**'} |")
  lines += ['', '| workload | `float(loss)` every step, pure / flaxtrain | state bytes | peak bytes: pure donated / '
            'not donated / `nnx.jit` / flaxtrain | aliased: pure / flaxtrain |', '|---|---|---|---|---|']
  for name, w in results['workloads'].items():
    c, d = w['float_loss_cost'], w['donation']
    ft_peak, ft_alias = ((d['flaxtrain_step']['peak_memory_bytes'], d['flaxtrain_step']['alias_size_bytes'])
                         if d['flaxtrain_step'] else ('-', '-'))
    lines.append(f"| {name} | {c['pure_jax']:.2f}x / {c['flaxtrain_step']:.2f}x | {d['state_bytes']:,} | "
                 f"{d['pure_jax']['peak_memory_bytes']:,} / {d['pure_jax_not_donated']['peak_memory_bytes']:,} / "
                 f"{d['nnx_jit']['peak_memory_bytes']:,} / {ft_peak:,} | "
                 f"{d['pure_jax']['alias_size_bytes']:,} / {ft_alias:,} |")
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='few steps; report the targets, do not enforce them')
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT,
                      help=f'where to write the JSON results (default: {DEFAULT_OUT.relative_to(DEFAULT_OUT.parents[2])})')
  parser.add_argument('--workloads', nargs='+', choices=list(WORKLOADS), default=list(WORKLOADS),
                      help='run only these workloads (targets of the others are not checked)')
  parser.add_argument('--table', type=pathlib.Path, metavar='JSON',
                      help='run nothing: print the README tables of the results in JSON')
  args = parser.parse_args(argv)
  if args.table:
    print(markdown_table(json.loads(args.table.read_text())))
    return 0
  rounds = QUICK_ROUNDS if args.quick else ROUNDS
  info = versions()
  print(', '.join(f'{k} {v}' for k, v in info.items()))
  begin = time.perf_counter()
  workloads = {}
  for name in args.workloads:
    workloads[name] = run_workload(name, WORKLOADS[name], rounds, args.quick)
    print_workload(name, workloads[name])
  targets = check_targets(workloads)
  disagree = [f'{w}/{v}' for w, r in workloads.items() for v, x in r['variants'].items() if not x['loss_agrees']]
  results = {
      'schema': SCHEMA,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'quick': args.quick, 'rounds': rounds, 'seconds': time.perf_counter() - begin,
      'versions': info, 'workloads': workloads, 'targets': targets,
      'all_targets_met': all(t['met'] for t in targets), 'all_losses_agree': not disagree,
  }
  print('\ntargets' + (' (quick run: reported, not enforced)' if args.quick else ''))
  for t in targets:
    print(f"  {'met   ' if t['met'] else 'MISSED'} {t['workload']:8s} {t['measured']:7.3f}x {t['op']} "
          f"{t['limit']:.2f}x  {t['what']}")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  tmp = args.out.with_suffix(args.out.suffix + '.tmp')
  tmp.write_text(json.dumps(results, indent=1) + '\n')
  tmp.replace(args.out)
  print(f"\n{results['seconds']:.0f} s; results written to {args.out}")
  if disagree:
    print('variants whose losses differ from pure JAX:', ', '.join(disagree))
    return 1
  if not args.quick and not results['all_targets_met']:
    print('targets missed:', ', '.join(f"{t['workload']}/{t['name']}" for t in targets if not t['met']))
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
