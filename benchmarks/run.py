"""How fast is a flaxtrain train step, against the plain JAX a reader could write?

    python benchmarks/run.py            # full run, checks the targets (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # a smoke run: few steps, targets reported but not enforced
    python benchmarks/run.py --out results.json

Every variant runs the same Adam update (the step variants return the loss,
gradient norm and accuracy as metrics) on the same batches of ``ft.load_digits``, on three
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
* ``flaxtrain_step_donate``: ``ft.make_train_step(donate=True)``, which
  donates as ``pure_jax`` does (no target: it shows what keeping the
  replaced arrays, the default, costs).
* ``pure_loop`` and the ``fit`` variants: whole runs of epochs over the same
  ``ft.DataLoader``. ``pure_loop`` is a hand-written loop around a pure
  ``jax.jit`` step (donating) that returns only the loss, keeps the epoch's
  losses on the device and fetches them in one transfer per epoch (with a
  finiteness check). ``fit`` is ``ft.fit`` called again and again on the same
  objects (no validation, no checkpoints, no progress bar), ``fit_fresh`` the
  same on a new model and optimizer of the same structure at every call,
  ``fit_many`` the same objects with ``steps_per_dispatch`` 16 (8 on the
  64-256-256-10 MLP), and
  ``pure_loop_old`` the loop floor this benchmark used before (the step's
  dict of three metrics, ``jax.device_get`` of the epoch's list), and
  ``pure_loop_1epoch`` / ``fit_1epoch`` one epoch per call, which exposes
  each call's fixed set-up cost. XLA compilations inside every timed call are
  counted (``ft.debug.count_compilations``).

Three more parts run in their own processes (``--parts``): Keras 3 on its
JAX backend as a peer of ``ft.fit`` (``keras_peer.py``; needs the ``[bench]``
extra), the time to a trained model in a fresh process (``fresh_process.py``)
and 200 ``fit`` calls on new models in one process (``many_fits.py``).

Method: each variant starts from the same initial model and first trains K
steps on the first K batches (the loops: one call); that warm-up compiles
(its first call is reported as compile time) and its losses must match
``pure_jax``'s (``pure_loop``'s) within a float tolerance, or the run fails.
Then the variants are timed in interleaved rounds (the order rotating each
round), each round a fixed number of steps ended by
``jax.block_until_ready``; a time is the median over rounds, and a ratio is
the median over rounds of the ratio of two variants' times in the same
round. Only ratios within one run are compared with the targets, since the
machine is shared and absolute times drift. The exit status is 1 when a
target is missed (in a full run) or when a variant disagrees with
``pure_jax``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx

import flaxtrain as ft

SCHEMA = 2
HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / 'results' / 'latest.json'
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
  fit_steps_per_dispatch: int  # steps_per_dispatch of fit_many


WORKLOADS = {
    'tiny_mlp': Workload('ft.MLP(64, (32, 32), 10), batch 32',
                         lambda: ft.MLP(64, (32, 32), 10, rngs=nnx.Rngs(0)), 32, 32, 160, 10, 16),
    'mlp': Workload('ft.MLP(64, (256, 256), 10), batch 128',
                    lambda: ft.MLP(64, (256, 256), 10, rngs=nnx.Rngs(0)), 128, 8, 48, 10, 8),
    'cnn': Workload('ft.CNN(), batch 64', lambda: ft.CNN(rngs=nnx.Rngs(0)), 64, 16, 16, 2, 16),
}
ROUNDS, QUICK_ROUNDS = 15, 2  # a quick run: K steps per round, one epoch per fit call
LOOP_ROUNDS = 31  # the loops' rounds are short (one call each); more of them steady the median


# "Never slower" where many() runs the very computation of single steps: on the CPU backend
# mode='auto' runs ft.CNN as a loop of the compiled single step (XLA's CPU convolutions are much slower
# inside a scan), so many/single is 1.00x by construction, give or take the noise. The issue sets no
# number for "never slower"; it is checked with the 1.05x band the issue uses for "as fast as" (the
# step targets on the MLP and the CNN), not with 1.00x, which a tie misses half the time.
SAME_SPEED = {'cnn': 1.05}

# Targets: (name, workload, numerator, denominator, op, limit, what it checks). The measured value is
# time(numerator) / time(denominator) per step, both from the same run.
TARGETS = [
    ('step_vs_pure', 'tiny_mlp', 'flaxtrain_step', 'pure_jax', '<=', 1.50,
     'flaxtrain step <= 1.50x the pure JAX step (dispatch-bound)'),
    ('step_vs_pure', 'mlp', 'flaxtrain_step', 'pure_jax', '<=', 1.05,
     'flaxtrain step <= 1.05x the pure JAX step'),
    ('step_vs_pure', 'cnn', 'flaxtrain_step', 'pure_jax', '<=', 1.05,
     'flaxtrain step <= 1.05x the pure JAX step'),
    ('fit_vs_pure_loop', 'tiny_mlp', 'fit', 'pure_loop', '<=', 1.02,
     'ft.fit (same objects, called again) <= 1.02x a hand-written pure JAX loop over the same DataLoader'),
    ('fit_vs_pure_loop', 'mlp', 'fit', 'pure_loop', '<=', 1.02,
     'ft.fit (same objects, called again) <= 1.02x a hand-written pure JAX loop over the same DataLoader'),
    ('fit_fresh_vs_pure_loop', 'tiny_mlp', 'fit_fresh', 'pure_loop', '<=', 1.02,
     'ft.fit on a new model of an already compiled structure <= 1.02x the hand-written loop'),
    ('fit_many_vs_pure_loop', 'tiny_mlp', 'fit_many', 'pure_loop', '<=', 0.40,
     'ft.fit(steps_per_dispatch=16) <= 0.40x the hand-written single-step loop, per step'),
    ('many_speedup_vs_pure', 'tiny_mlp', 'pure_jax', 'flaxtrain_many', '>=', 4.0,
     'many steps per dispatch >= 4x faster per step than the pure JAX single step'),
    ('many_speedup_vs_outline', 'tiny_mlp', 'outline_loop', 'flaxtrain_many', '>=', 25.0,
     "many steps per dispatch >= 25x faster per step than the outline's nnx.jit loop"),
    *[('many_vs_single', name, 'flaxtrain_many', 'flaxtrain_step', '<=', SAME_SPEED.get(name, 1.00),
       'turning many steps on never makes training slower (per step, <= single steps'
       + (', within the 1.05x noise band: auto runs single steps here)' if name in SAME_SPEED else ')'))
      for name in WORKLOADS],
]

# Targets on the other parts and on counts: (name, where, op, limit, what). ``where`` is a workload or
# a part; the measured value is read by ``other_measurements``.
OTHER_TARGETS = [
    ('fit_fresh_compilations', 'tiny_mlp', '<=', 0,
     'ft.fit on a new model of an already compiled structure compiles nothing (per timed call)'),
    ('fit_vs_keras', 'keras', '<=', 0.50,
     "ft.fit <= 0.50x Keras 3's fit, per step"),
    ('fit_many_vs_keras_many', 'keras', '<=', 0.50,
     "ft.fit(steps_per_dispatch=16) <= 0.50x Keras 3's fit(steps_per_execution=16), per step"),
    ('fresh_fit_vs_keras', 'fresh', '<=', 1.00,
     "time to a trained model in a fresh process: ft.fit <= 1.00x Keras 3's fit (medians)"),
    ('many_fits_compilations', 'many_fits', '<=', 0,
     '200 fit calls on new models: compilations after the first call'),
    ('many_fits_rss_growth_mb', 'many_fits', '<=', 50.0,
     '200 fit calls on new models: resident memory growth from call 20 to 200, MB'),
]
PARTS = ('steps', 'keras', 'fresh', 'many_fits')


# ----------------------------------------------------------------------------------------------
# The variants. Each factory gets a fresh model and the workload's batches and returns a Runner.


@dataclasses.dataclass
class Runner:
  """One variant, ready to be called: ``run(inputs[i])`` does ``steps_per_call`` steps.

  ``prepare``, if given, runs before every call, untimed (``fit_fresh`` builds its new model there).
  ``checked_steps``, if given, limits the loss check to the first so many warm-up steps (0: none).
  """
  run: Callable[[Any], Any]
  inputs: list[Any]
  steps_per_call: int
  losses: Callable[[Any], np.ndarray]  # the per-step losses of one call's output
  prepare: Callable[[], None] | None = None
  checked_steps: int | None = None


def _metrics_of_step(loss, aux, grads) -> dict[str, jax.Array]:
  return {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}


def _single(run: Callable, data: 'Data') -> Runner:
  return Runner(run, data.batches, 1, lambda m: np.atleast_1d(np.asarray(m['loss'])))


def make_pure_step(model: nnx.Module, tx: optax.GradientTransformation, *, donate: bool = True,
                   loss_only: bool = False):
  """The floor: ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` under ``jax.jit``.

  The parameters travel as plain nested dicts; ``nnx.merge`` only runs while tracing, to apply
  the model's layers, so it costs nothing per call. With ``loss_only`` the step returns the loss
  alone instead of the metrics dict (what a hand-written loop that tracks its loss needs).
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
    metrics = loss if loss_only else _metrics_of_step(loss, aux, grads)
    return optax.apply_updates(params, updates), opt_state, metrics

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


def flaxtrain_step(model, tx, data, *, read_loss: bool = False, donate: bool = False) -> Runner:
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = ft.make_train_step(donate=donate)

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


@jax.jit
def _stack_losses(*losses: jax.Array) -> jax.Array:
  """One dispatch and one transfer for an epoch's losses (``jax.device_get`` of a list pays per array)."""
  return jnp.stack(losses)


def pure_loop(workload: Workload, data: 'Data', epochs: int, *, old: bool = False) -> Runner:
  """A hand-written loop over the DataLoader around a pure step; one call = ``epochs`` epochs.

  The step returns only the loss; the epoch's losses stay on the device until the epoch ends, then
  come back in one transfer, as one stacked array, and are checked to be finite. With ``old``, the
  floor this benchmark used before (kept to show the difference, see README.md): the step returns
  the dict of three metrics and the losses come back through ``jax.device_get`` of the list.
  """
  step, params, opt_state = make_pure_step(workload.make_model(), optax.adam(LEARNING_RATE), loss_only=not old)
  box = [params, opt_state]

  def run(_):
    losses = []
    for epoch in range(epochs):
      epoch_losses = []
      for batch in data.loader.epoch(epoch):
        box[0], box[1], out = step(box[0], box[1], batch)
        epoch_losses.append(out['loss'] if old else out)
      # The one sync per epoch.
      epoch_losses = np.asarray(jax.device_get(epoch_losses) if old else _stack_losses(*epoch_losses))
      if not np.all(np.isfinite(epoch_losses)):
        raise FloatingPointError(f'non-finite loss in epoch {epoch}')
      losses.append(epoch_losses)
    return np.concatenate(losses)

  return Runner(run, [None], epochs * len(data.loader), lambda losses: losses,
                checked_steps=len(data.loader) if epochs == 1 else None)


def fit(workload: Workload, data: 'Data', epochs: int, *, steps_per_dispatch: int = 1,
        fresh: bool = False) -> Runner:
  """``ft.fit`` for ``epochs`` epochs per call; no validation, no checkpoints, no progress bar.

  Each call goes on training the same model and optimizer, or, with ``fresh``, a new model and
  optimizer built (untimed) before every call: a structure ``fit`` has already compiled.
  """
  objects = {}

  def build():
    model = workload.make_model()
    objects['model'] = model
    objects['optimizer'] = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)

  build()

  def run(_):
    history = ft.fit(objects['model'], objects['optimizer'], data.loader, epochs=epochs, progress=False,
                     steps_per_dispatch=steps_per_dispatch)
    return np.asarray(history.steps()['loss'])

  steps = epochs * len(data.loader)
  return Runner(run, [None], steps, lambda losses: losses, prepare=build if fresh else None,
                checked_steps=steps if fresh else (len(data.loader) if epochs == 1 else None))


def keras_available() -> bool:
  """Whether Keras 3 is installed (the ``[bench]`` extra); it is never imported in this process."""
  import importlib.util
  return importlib.util.find_spec('keras') is not None


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
    'flaxtrain_step_donate': functools.partial(flaxtrain_step, donate=True),
}
# Loop variants: factory(workload, data, epochs of the workload's call) -> Runner.
LOOP_VARIANTS = {
    'pure_loop': pure_loop,
    'fit': fit,
    'fit_fresh': functools.partial(fit, fresh=True),
    'fit_many': lambda workload, data, epochs: fit(workload, data, epochs,
                                                   steps_per_dispatch=workload.fit_steps_per_dispatch),
    'pure_loop_old': functools.partial(pure_loop, old=True),
    'pure_loop_1epoch': lambda workload, data, epochs: pure_loop(workload, data, 1),
    'fit_1epoch': lambda workload, data, epochs: fit(workload, data, 1),
}
ONE_EPOCH_VARIANTS = ('pure_loop_1epoch', 'fit_1epoch')  # left out of a quick run: its calls are 1 epoch anyway
TINY_ONLY_WHEN_QUICK = ('fit_fresh', 'pure_loop_old')  # same code on every workload: a quick run does it once


def loop_variants(workload: str, quick: bool) -> list[str]:
  """The loop variants a run times on ``workload``: all of them, or fewer in a quick run."""
  if not quick:
    return list(LOOP_VARIANTS)
  return [name for name in LOOP_VARIANTS if name not in ONE_EPOCH_VARIANTS
          and (workload == 'tiny_mlp' or name not in TINY_ONLY_WHEN_QUICK)]

RATIO_TO = {name: 'pure_loop' for name in LOOP_VARIANTS}
RATIO_TO.update(pure_loop_1epoch='pure_loop', fit_1epoch='pure_loop_1epoch')
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


def timed_calls(runner: Runner, calls: int, start: int = 0) -> tuple[float, list[str], float]:
  """Seconds for ``calls`` calls, cycling over the runner's inputs, up to block_until_ready.

  Also returns the names of the functions XLA compiled inside the timed calls and the seconds
  spent compiling (``prepare`` runs outside both).
  """
  inputs = [runner.inputs[i % len(runner.inputs)] for i in range(start, start + calls)]
  if runner.prepare is None:
    with ft.debug.count_compilations() as compiled:
      out = None
      begin = time.perf_counter()
      for x in inputs:
        out = runner.run(x)
      jax.block_until_ready(out)
      seconds = time.perf_counter() - begin
    return seconds, compiled.names, sum(compiled.seconds)
  seconds, names, compile_s = 0.0, [], 0.0
  for x in inputs:
    runner.prepare()
    with ft.debug.count_compilations() as compiled:
      begin = time.perf_counter()
      jax.block_until_ready(runner.run(x))
      seconds += time.perf_counter() - begin
    names, compile_s = names + compiled.names, compile_s + sum(compiled.seconds)
  return seconds, names, compile_s


def warm_up(runner: Runner, steps: int) -> tuple[float, np.ndarray]:
  """Runs the first ``steps`` steps: returns the first call's seconds (compile) and the losses."""
  losses = []
  calls = -(-steps // runner.steps_per_call)
  for i in range(calls):
    if runner.prepare is not None:
      runner.prepare()
    begin = time.perf_counter()
    out = jax.block_until_ready(runner.run(runner.inputs[i % len(runner.inputs)]))
    if i == 0:
      first_call = time.perf_counter() - begin
    losses.append(runner.losses(out))
  return first_call, np.concatenate(losses)


def measure(names: list[str], make: Callable[[str], Runner], warmup_steps: int, steps: int,
            rounds: int) -> dict[str, Any]:
  """Builds, checks and times variants side by side; returns per-variant results.

  The first name is the reference: every other variant's warm-up losses must match its own (over
  the runner's ``checked_steps``, when it sets them).
  """
  runners, results, reference = {}, {}, None
  for name in names:
    runners[name] = runner = make(name)
    if steps % runner.steps_per_call:
      raise ValueError(f'{name}: {steps} steps per round is not a multiple of {runner.steps_per_call}')
    with ft.debug.count_compilations() as compiled:
      first_call, losses = warm_up(runner, max(warmup_steps, runner.steps_per_call))
    if reference is None:
      reference = losses
    n = min(len(losses), len(reference))
    if runner.checked_steps is not None:
      n = min(n, runner.checked_steps)
    diff = float(np.max(np.abs(losses[:n] - reference[:n]))) if n else None
    results[name] = {
        'first_call_s': first_call,
        'warmup_compilations': compiled.count,
        'checked_steps': n,
        'max_loss_diff': diff,
        'loss_agrees': bool(np.allclose(losses[:n], reference[:n], rtol=LOSS_RTOL, atol=LOSS_ATOL)) if n else None,
        'losses_finite': bool(np.all(np.isfinite(losses))),
    }
  samples = {name: [] for name in names}
  compilations = {name: [] for name in names}
  compile_s = {name: 0.0 for name in names}
  compiled_names = {name: set() for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:  # rotate the order, so that no variant always goes first
      runner = runners[name]
      calls = steps // runner.steps_per_call
      seconds, compiled, seconds_compiling = timed_calls(runner, calls, start=r * calls)
      samples[name].append(seconds / steps)
      compilations[name].append(len(compiled) / calls)
      compile_s[name] += seconds_compiling
      compiled_names[name].update(compiled)
  for name in names:
    seconds = float(np.median(samples[name]))
    results[name].update({'us_per_step': seconds * 1e6, 'steps_per_s': 1.0 / seconds,
                          'min_us_per_step': min(samples[name]) * 1e6,
                          'rounds_us_per_step': [s * 1e6 for s in samples[name]],
                          'steps_per_call': runners[name].steps_per_call,
                          'compilations_per_timed_call': float(max(compilations[name])),
                          'compile_s_timed': compile_s[name],
                          'compiled_in_timed_calls': sorted(compiled_names[name])})
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


def setup_cost_ms(loops: dict[str, Any], epochs: int, steps_per_epoch: int) -> dict[str, float] | None:
  """Each call's fixed cost, from one-epoch calls against ``epochs``-epoch calls of the same loop.

  A call of ``e`` epochs takes ``F + e * S * a`` (F: the fixed cost, S steps of ``a`` each), so
  ``F = epochs * S * (u1 - uE) / (epochs - 1)`` from the two medians per step ``u1`` and ``uE``.
  """
  if epochs < 2 or not all(name in loops for name in ONE_EPOCH_VARIANTS):
    return None
  cost = {}
  for long, short in (('pure_loop', 'pure_loop_1epoch'), ('fit', 'fit_1epoch')):
    u1, ue = loops[short]['us_per_step'], loops[long]['us_per_step']
    cost[long] = epochs * steps_per_epoch * (u1 - ue) / (epochs - 1) / 1e3
  return cost


def run_workload(name: str, workload: Workload, rounds: int, loop_rounds: int, quick: bool) -> dict[str, Any]:
  data = load_data(workload)
  k = workload.many_k
  steps = k if quick else workload.steps_per_round

  def make_step_variant(variant: str) -> Runner:
    return STEP_VARIANTS[variant](workload.make_model(), optax.adam(LEARNING_RATE), data)

  variants = measure(list(STEP_VARIANTS), make_step_variant, k, steps, rounds)
  epochs = 1 if quick else workload.fit_epochs
  loops = measure(loop_variants(name, quick), lambda variant: LOOP_VARIANTS[variant](workload, data, epochs), 0,
                  epochs * len(data.loader), loop_rounds)
  for result in variants.values():
    result['ratio'] = paired_ratio(result, variants['pure_jax'])
  for variant, result in loops.items():
    result['ratio_to'] = RATIO_TO[variant]
    result['ratio'] = paired_ratio(result, loops[RATIO_TO[variant]])
  return {
      'description': workload.description, 'batch_size': workload.batch_size, 'many_k': k,
      'steps_per_round': steps, 'fit_epochs_per_call': epochs, 'loop_rounds': loop_rounds,
      'fit_steps_per_dispatch': workload.fit_steps_per_dispatch,
      'steps_per_epoch': len(data.loader),
      'variants': {**variants, **loops},
      'setup_ms_per_call': setup_cost_ms(loops, epochs, len(data.loader)),
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


# ----------------------------------------------------------------------------------------------
# The parts that run in their own processes


def run_script(script: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs ``benchmarks/<script>`` in a new Python process; returns the JSON it wrote.

  Its output goes straight to ours. Raises RuntimeError when it wrote no results.
  """
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / 'results.json'
    command = [sys.executable, str(HERE / script), *args, '--json', str(out)]
    sys.stdout.flush()
    status = subprocess.run(command, env={**os.environ, **(env or {})}, check=False).returncode
    if not out.exists():
      raise RuntimeError(f'{script} exited with status {status} and wrote no results: {" ".join(command)}')
    result = json.loads(out.read_text())
  result['exit_status'] = status
  return result


KERAS_MISSING = ('keras is not installed: install the [bench] extra '
                 '(.venv/bin/python -m pip install -c constraints.txt -e ".[bench]"; `make bench` does)')


def run_part(part: str, quick: bool) -> dict[str, Any]:
  """One of the parts run in its own process: 'keras', 'fresh' or 'many_fits'."""
  if part == 'keras':
    if not keras_available():
      return {'skipped': KERAS_MISSING}
    return run_script('keras_peer.py', ['--quick'] if quick else [], env={'KERAS_BACKEND': 'jax'})
  if part == 'fresh':
    return run_script('fresh_process.py', ['--quick'] if quick else [])
  if part == 'many_fits':
    return run_script('many_fits.py', ['--calls', '3'] if quick else [])
  raise ValueError(f'part: expected one of {PARTS[1:]}, got {part!r}')


# ----------------------------------------------------------------------------------------------
# Targets


def other_measurements(workloads: dict[str, Any], parts: dict[str, Any]) -> dict[tuple[str, str], Any]:
  """The measured value of each OTHER_TARGETS entry whose workload or part was run (None: not measured)."""
  found = {}
  fresh_fit = workloads.get('tiny_mlp', {}).get('variants', {}).get('fit_fresh', {})
  if 'compilations_per_timed_call' in fresh_fit:
    found[('fit_fresh_compilations', 'tiny_mlp')] = fresh_fit['compilations_per_timed_call']
  if 'keras' in parts:
    ratios = parts['keras'].get('ratios', {})
    found[('fit_vs_keras', 'keras')] = ratios.get('fit_vs_keras')
    found[('fit_many_vs_keras_many', 'keras')] = ratios.get('fit_many_vs_keras_many')
  if 'fresh' in parts:
    found[('fresh_fit_vs_keras', 'fresh')] = parts['fresh'].get('ratios', {}).get('flaxtrain_vs_keras')
  if 'many_fits' in parts:
    found[('many_fits_compilations', 'many_fits')] = parts['many_fits'].get('compilations_after_first')
    found[('many_fits_rss_growth_mb', 'many_fits')] = parts['many_fits'].get('rss_growth_mb')
  return found


def check_targets(workloads: dict[str, Any], parts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """Each target of a workload or part that was run, with its measured value and whether it was met.

  A target whose part ran but could not measure it (Keras not installed, too few calls) is listed
  with ``measured`` None, not met, and the reason in ``note``.
  """
  checked, parts = [], parts or {}
  for name, workload, numerator, denominator, op, limit, what in TARGETS:
    if workload not in workloads:
      continue
    variants = workloads[workload]['variants']
    value = paired_ratio(variants[numerator], variants[denominator])
    checked.append(_target(name, workload, value, op, limit, what,
                           f'{numerator} / {denominator}: median over rounds of the ratio of times per step'))
  measured = other_measurements(workloads, parts)
  for name, where, op, limit, what in OTHER_TARGETS:
    if (name, where) not in measured:
      continue
    value = measured[(name, where)]
    note = None
    if value is None:
      note = parts.get(where, {}).get('skipped') or parts.get(where, {}).get('note') or 'not measured'
    checked.append(_target(name, where, value, op, limit, what, None, note))
  return checked


def _target(name, where, value, op, limit, what, formula, note=None) -> dict[str, Any]:
  met = value is not None and (value <= limit if op == '<=' else value >= limit)
  target = {'name': name, 'workload': where, 'measured': value, 'op': op, 'limit': limit, 'met': bool(met),
            'what': what}
  if formula:
    target['formula'] = formula
  if note:
    target['note'] = note
  return target


# ----------------------------------------------------------------------------------------------
# Reports


def print_workload(name: str, result: dict[str, Any]) -> None:
  print(f"\n{name}: {result['description']}; K={result['many_k']} steps per .many call; "
        f"loops: {result['fit_epochs_per_call']} epochs of {result['steps_per_epoch']} steps per call")
  print(f"  {'variant':22s} {'us/step':>9s} {'steps/s':>9s} {'ratio':>7s}  {'compile s':>9s}  "
        f"{'compiles/call':>13s}  loss check")
  for variant, r in result['variants'].items():
    against = r.get('ratio_to', 'pure_jax')
    check = ('ok' if r['loss_agrees'] else f"DIFFERS by {r['max_loss_diff']:.2e}") if r['checked_steps'] else '-'
    print(f"  {variant:22s} {r['us_per_step']:9.1f} {r['steps_per_s']:9.0f} {r['ratio']:6.2f}x"
          f"  {r['first_call_s']:9.2f}  {r['compilations_per_timed_call']:13g}  {check}"
          + ('' if against == 'pure_jax' else f'  (vs {against})'))
  for variant, r in result['variants'].items():
    if r['compiled_in_timed_calls']:
      print(f"  {variant} compiled in timed calls: {', '.join(r['compiled_in_timed_calls'][:8])}")
  if result['setup_ms_per_call']:
    print('  fixed cost per call (from 1-epoch against whole calls): '
          + ', '.join(f'{k} {v:.2f} ms' for k, v in result['setup_ms_per_call'].items()))
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


def _fmt(value: Any, spec: str = '.3f', suffix: str = 'x') -> str:
  return '-' if value is None else f'{value:{spec}}{suffix}'


def markdown_table(results: dict[str, Any]) -> str:
  """The README's results tables, from the JSON a run wrote."""
  v = results['versions']
  lines = [f"Run of {results['date'][:10]} ({'quick' if results['quick'] else 'full'}, {results['rounds']} rounds, "
           f"{results['seconds']:.0f} s): {v['machine']}, {v['cpu_count']} CPU cores, JAX {v['backend']} backend; "
           f"jax {v['jax']}, flax {v['flax']}, optax {v['optax']}; load average at the start "
           f"{', '.join(f'{x:.1f}' for x in v['load_average'] or [])}.", '',
           '| workload | variant | µs/step | steps/s | ratio | compile s | compilations per timed call |',
           '|---|---|---|---|---|---|---|']
  for name, w in results['workloads'].items():
    for i, (variant, r) in enumerate(w['variants'].items()):
      against = '' if r.get('ratio_to', 'pure_jax') == 'pure_jax' else f" (vs `{r['ratio_to']}`)"
      lines.append(f"| {name if i == 0 else ''} | `{variant}` | {r['us_per_step']:.1f} | {r['steps_per_s']:.0f} | "
                   f"{r['ratio']:.2f}x{against} | {r['first_call_s']:.2f} | {r['compilations_per_timed_call']:g} |")
  lines += ['', '| workload | fixed cost per call: `pure_loop` / `fit` |', '|---|---|']
  for name, w in results['workloads'].items():
    s = w.get('setup_ms_per_call')
    lines.append(f"| {name} | " + (f"{s['pure_loop']:.2f} ms / {s['fit']:.2f} ms" if s else '-') + ' |')
  parts = results.get('parts', {})
  keras = parts.get('keras')
  if keras and 'variants' in keras:
    lines += ['', f"Keras 3 as a peer ({keras['epochs']} epochs of {keras['steps_per_epoch']} steps per call, "
              f"{keras['rounds']} rounds, one process):", '',
              '| variant | µs/step | ratio to `pure_loop` | compile s | compilations per timed call |',
              '|---|---|---|---|---|']
    for variant, r in keras['variants'].items():
      lines.append(f"| `{variant}` | {r['us_per_step']:.1f} | {r['ratio']:.2f}x | {r['first_call_s']:.2f} | "
                   f"{r['compilations_per_timed_call']:g} |")
  fresh = parts.get('fresh')
  if fresh and 'medians' in fresh:
    lines += ['', f"Time to a trained model in a fresh process (after the imports; medians of {fresh['rounds']} "
              f"processes each, alternated; {fresh['epochs']} epochs):", '',
              '| variant | total s | build s | fit s | compilations: build / fit | compile s: build / fit |',
              '|---|---|---|---|---|---|']
    for variant, m in fresh['medians'].items():
      lines.append(f"| {variant} | {m['total_s']:.2f} | {m['build_s']:.2f} | {m['fit_s']:.2f} | "
                   f"{m['build_compilations']:g} / {m['fit_compilations']:g} | "
                   f"{m['build_compile_s']:.2f} / {m['fit_compile_s']:.2f} |")
  many = parts.get('many_fits')
  if many and 'rss_mb' in many:
    lines += ['', f"{many['calls']} `fit` calls on new models: compilations after the first call "
              f"{many['compilations_after_first']}; resident memory (MB) after call "
              + ', '.join(f'{k}: {x:.0f}' for k, x in many['rss_mb'].items()) + '.']
  lines += ['', '| target | where | measured | limit | met |', '|---|---|---|---|---|']
  for t in results['targets']:
    ratio = not t['name'].endswith(('compilations', '_mb'))  # the others are counts and megabytes
    lines.append(f"| {t['what']} | {t['workload']} | {_fmt(t['measured'], '.3f' if ratio else 'g', 'x' if ratio else '')} | "
                 f"{t['op']} {t['limit']:g}{'x' if ratio else ''} | {'yes' if t['met'] else '**no**'} |")
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
                      help="the workloads of the 'steps' part (targets of the others are not checked)")
  parser.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS),
                      help='run only these parts: steps (the workloads, in this process), keras '
                           '(keras_peer.py), fresh (fresh_process.py), many_fits (many_fits.py)')
  parser.add_argument('--table', type=pathlib.Path, metavar='JSON',
                      help='run nothing: print the README tables of the results in JSON')
  args = parser.parse_args(argv)
  if args.table:
    print(markdown_table(json.loads(args.table.read_text())))
    return 0
  rounds = QUICK_ROUNDS if args.quick else ROUNDS
  loop_rounds = QUICK_ROUNDS if args.quick else LOOP_ROUNDS
  info = versions()
  print(', '.join(f'{k} {v}' for k, v in info.items()))
  begin = time.perf_counter()
  workloads, parts = {}, {}
  if 'steps' in args.parts:
    for name in args.workloads:
      workloads[name] = run_workload(name, WORKLOADS[name], rounds, loop_rounds, args.quick)
      print_workload(name, workloads[name])
  for part in PARTS[1:]:
    if part in args.parts:
      print(f'\n{part}:', flush=True)
      parts[part] = run_part(part, args.quick)
      if 'skipped' in parts[part]:
        print(f"  skipped: {parts[part]['skipped']}")
  targets = check_targets(workloads, parts)
  disagree = [f'{w}/{v}' for w, r in workloads.items() for v, x in r['variants'].items() if x['loss_agrees'] is False]
  disagree += [f'{p}: {x}' for p, r in parts.items() for x in r.get('problems', [])]
  results = {
      'schema': SCHEMA,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'quick': args.quick, 'rounds': rounds, 'loop_rounds': loop_rounds, 'seconds': time.perf_counter() - begin,
      'versions': info, 'workloads': workloads, 'parts': parts, 'targets': targets,
      'all_targets_met': all(t['met'] for t in targets), 'all_losses_agree': not disagree,
  }
  print('\ntargets' + (' (quick run: reported, not enforced)' if args.quick else ''))
  for t in targets:
    value = 'not measured' if t['measured'] is None else f"{t['measured']:.3f}"
    print(f"  {'met   ' if t['met'] else 'MISSED'} {t['workload']:9s} {value:>8s} {t['op']} "
          f"{t['limit']:g}  {t['what']}" + (f"  ({t['note']})" if t.get('note') else ''))
  args.out.parent.mkdir(parents=True, exist_ok=True)
  tmp = args.out.with_suffix(args.out.suffix + '.tmp')
  tmp.write_text(json.dumps(results, indent=1) + '\n')
  tmp.replace(args.out)
  print(f"\n{results['seconds']:.0f} s; results written to {args.out}")
  if disagree:
    print('variants whose losses differ from pure JAX, or parts that failed a check:', ', '.join(disagree))
    return 1
  if not args.quick and not results['all_targets_met']:
    print('targets missed:', ', '.join(f"{t['workload']}/{t['name']}" for t in targets if not t['met']))
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
