"""Speed of flaxtrain's train step against plain JAX, measured in one run, as ratios.

    python benchmarks/run.py            # full run (about a minute on 2 cores)
    python benchmarks/run.py --quick    # a smoke run: few steps, targets not enforced

Variants of one Adam step on digits batches of 64:

* ``plain_jax``: ``nnx.split`` once, then a pure function of (params, opt_state, batch) under
  ``jax.jit``, updating with optax; ``nnx.merge`` only inside the traced function. The baseline.
* ``flaxtrain``: ``ft.make_train_step()`` called as ``step(model, optimizer, batch)`` (``nnx.jit``).
* ``flaxtrain_cached``: the same step wrapped in ``nnx.cached_partial(step, model, optimizer)``,
  which skips re-walking the module graph in Python on every call.

Every variant computes the same loss, accuracy and gradient norm. The variants are timed in
interleaved rounds (after a warm-up that compiles) so that load on a shared machine affects them alike;
each figure is the median of the rounds, and only ratios to ``plain_jax`` of the same run are compared
with targets. The exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx

import flaxtrain as ft

# Upper bounds on (variant time / plain_jax time), per model. The MLP is so small that Python-side
# dispatch dominates its step; the CNN's step is dominated by computation.
TARGETS = {
    ('cnn', 'flaxtrain'): 1.3,
    ('cnn', 'flaxtrain_cached'): 1.3,
    ('mlp', 'flaxtrain_cached'): 3.0,
}
MODELS = {
    'mlp': lambda: ft.MLP(64, (128,), 10, rngs=nnx.Rngs(0)),
    'cnn': lambda: ft.CNN(rngs=nnx.Rngs(0)),
}


def plain_jax(model: nnx.Module, tx: optax.GradientTransformation) -> Callable:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = {'params': params, 'opt': tx.init(params)}

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      return ft.classification_loss(nnx.merge(graphdef, p, rest), batch)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
    return optax.apply_updates(params, updates), opt_state, metrics

  def run(batch):
    state['params'], state['opt'], metrics = step(state['params'], state['opt'], batch)
    return metrics

  return run


def flaxtrain_step(model: nnx.Module, tx: optax.GradientTransformation) -> Callable:
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = ft.make_train_step()
  return lambda batch: step(model, optimizer, batch)


def flaxtrain_cached(model: nnx.Module, tx: optax.GradientTransformation) -> Callable:
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return nnx.cached_partial(ft.make_train_step(), model, optimizer)


VARIANTS = {'plain_jax': plain_jax, 'flaxtrain': flaxtrain_step, 'flaxtrain_cached': flaxtrain_cached}


def seconds_per_step(run: Callable, batches: list, steps: int) -> float:
  start = time.perf_counter()
  for i in range(steps):
    metrics = run(batches[i % len(batches)])
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps


def measure(model_name: str, steps: int, rounds: int) -> dict[str, float]:
  """Median seconds per step of each variant, timed in interleaved rounds."""
  splits = ft.load_digits(seed=0)
  batches = [jax.device_put(b) for b in ft.DataLoader(splits.train, 64, seed=0).epoch(0)]
  runs = {name: make(MODELS[model_name](), optax.adam(1e-3)) for name, make in VARIANTS.items()}
  first = {}
  for name, run in runs.items():  # warm-up: compile, and check the variants agree
    first[name] = jax.device_get(run(batches[0]))
    seconds_per_step(run, batches, 3)
  for name in runs:
    np.testing.assert_allclose(first[name]['loss'], first['plain_jax']['loss'], rtol=1e-5)
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      times[name].append(seconds_per_step(run, batches, steps))
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='few steps; report, do not enforce targets')
  parser.add_argument('--out', type=pathlib.Path, help='also write the results as JSON here')
  args = parser.parse_args(argv)
  steps, rounds = (5, 2) if args.quick else (100, 7)
  results = {'machine': f'{platform.machine()}, {jax.devices()[0].device_kind}, {jax.device_count()} device(s)',
             'models': {}}
  missed = []
  print(f"{'model':5s} {'variant':17s} {'ms/step':>8s} {'vs plain':>9s} {'target':>7s}")
  for model_name in MODELS:
    medians = measure(model_name, steps, rounds)
    results['models'][model_name] = {}
    for variant, seconds in medians.items():
      ratio = seconds / medians['plain_jax']
      target = TARGETS.get((model_name, variant))
      ok = target is None or ratio <= target
      if not ok:
        missed.append(f'{model_name}/{variant}: {ratio:.2f}x > {target}x')
      results['models'][model_name][variant] = {'ms_per_step': seconds * 1e3, 'ratio': ratio, 'target': target}
      print(f"{model_name:5s} {variant:17s} {seconds * 1e3:8.3f} {ratio:8.2f}x "
            f"{'' if target is None else f'<={target}x':>7s}{'' if ok else '  MISSED'}")
  print(results['machine'])
  if args.out:
    args.out.write_text(json.dumps(results, indent=2))
  if missed and not args.quick:
    print('targets missed:', '; '.join(missed))
    return 1
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
