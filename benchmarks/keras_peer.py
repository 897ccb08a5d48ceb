"""Keras 3 on its JAX backend as a peer of ft.fit: time per step, side by side in one process.

    KERAS_BACKEND=jax python benchmarks/keras_peer.py           # 10 epochs per call, 15 rounds
    python benchmarks/keras_peer.py --quick                     # 1 epoch per call, 2 rounds

Needs the ``[bench]`` extra (``keras==3.15.1``); ``benchmarks/run.py`` runs this
script in its own process so that Keras never loads into the main benchmark.
The backend is set to JAX here, before Keras is imported, whatever the
environment says.

Five variants train the tiny MLP 64-32-32-10 (ReLU, logits) on the digits,
batch 32, Adam at 1e-3, 10 epochs of 33 steps per call, each call going on
from where the previous one stopped:

* ``pure_loop``: the hand-written pure-JAX loop of ``run.py`` (a donated
  ``jax.jit`` step returning the loss, the epoch's losses fetched once);
* ``fit`` and ``fit_many``: ``ft.fit(..., progress=False)``, with
  ``steps_per_dispatch`` 1 and 16;
* ``keras`` and ``keras_many``: a ``keras.Sequential`` of the same layers
  (Flatten, Dense 32 ReLU, Dense 32 ReLU, Dense 10), compiled with
  ``Adam(1e-3, epsilon=1e-8)`` (optax's epsilon),
  ``SparseCategoricalCrossentropy(from_logits=True)`` and the accuracy metric
  (``ft.fit`` records accuracy too), with ``steps_per_execution`` 1 and 16,
  trained by ``model.fit(x, y, batch_size=32, epochs=10, shuffle=True,
  verbose=0)`` on the loader's 33 * 32 = 1056 examples per epoch (so that
  every batch is full, as the DataLoader's are: no ragged last batch).

Keras initializes and shuffles its own way, so its losses are not compared
step by step; each Keras call must end with a finite loss below the first
epoch's. ``fit`` and ``fit_many`` are checked against the pure loop as in
``run.py``. Timing and ratios as in ``run.py``: interleaved rounds with a
rotating order, medians of per-round ratios.
"""

from __future__ import annotations

import os

os.environ['KERAS_BACKEND'] = 'jax'  # before anything imports keras

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: the pure loop, fit, the timing harness)

WORKLOAD = bench.WORKLOADS['tiny_mlp']
MANY = 16  # steps_per_dispatch of ft.fit and steps_per_execution of Keras
ROUNDS, QUICK_ROUNDS = 15, 2
# (name, numerator, denominator): ratios of times per step, medians of per-round ratios.
RATIOS = [('fit_vs_keras', 'fit', 'keras'), ('fit_many_vs_keras_many', 'fit_many', 'keras_many')]


def keras_fit(data: bench.Data, epochs: int, steps_per_execution: int) -> bench.Runner:
  """``keras.Model.fit`` on the tiny MLP; one call = ``epochs`` epochs; returns per-epoch mean losses."""
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.Input((8, 8, 1)),
      keras.layers.Flatten(),
      keras.layers.Dense(32, activation='relu'),
      keras.layers.Dense(32, activation='relu'),
      keras.layers.Dense(10),
  ])
  model.compile(optimizer=keras.optimizers.Adam(bench.LEARNING_RATE, epsilon=1e-8),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=['accuracy'], steps_per_execution=steps_per_execution)
  loader = data.loader
  n = len(loader) * loader.batch_size  # every batch full, as the DataLoader's
  x, y = loader.data['image'][:n], loader.data['label'][:n]

  def run(_):
    history = model.fit(x, y, batch_size=loader.batch_size, epochs=epochs, shuffle=True, verbose=0)
    return np.asarray(history.history['loss'])

  return bench.Runner(run, [None], epochs * len(loader), lambda losses: losses, checked_steps=0)


def measure(quick: bool) -> dict[str, Any]:
  data = bench.load_data(WORKLOAD)
  epochs = 1 if quick else WORKLOAD.fit_epochs
  rounds = QUICK_ROUNDS if quick else ROUNDS
  make = {
      'pure_loop': lambda: bench.pure_loop(WORKLOAD, data, epochs),
      'fit': lambda: bench.fit(WORKLOAD, data, epochs),
      'fit_many': lambda: bench.fit(WORKLOAD, data, epochs, steps_per_dispatch=MANY),
      'keras': lambda: keras_fit(data, epochs, 1),
      'keras_many': lambda: keras_fit(data, epochs, MANY),
  }
  first_losses = {}

  def build(name: str) -> bench.Runner:
    runner = make[name]()
    if name.startswith('keras'):  # keep the first call's epoch losses for the sanity check
      inner = runner.run

      def run(x, inner=inner, name=name):
        losses = inner(x)
        first_losses.setdefault(name, losses)
        return losses

      runner.run = run
    return runner

  variants = bench.measure(list(make), build, 0, epochs * len(data.loader), rounds)
  problems = []
  for name, r in variants.items():
    r['ratio'] = bench.paired_ratio(r, variants['pure_loop'])
    if r['loss_agrees'] is False:
      problems.append(f'{name} trained differently from pure_loop (max loss difference {r["max_loss_diff"]:.2e})')
    if not r['losses_finite']:
      problems.append(f'{name}: a non-finite loss')
  for name, losses in first_losses.items():
    if epochs > 1 and not losses[-1] < losses[0]:
      problems.append(f'{name}: the loss did not fall over its first call ({losses[0]:.3f} -> {losses[-1]:.3f})')
  return {
      'description': WORKLOAD.description, 'keras': keras.__version__, 'backend': keras.backend.backend(),
      'epochs': epochs, 'steps_per_epoch': len(data.loader), 'rounds': rounds, 'many': MANY,
      'variants': variants,
      'ratios': {name: bench.paired_ratio(variants[a], variants[b]) for name, a, b in RATIOS},
      'keras_first_call_epoch_losses': {k: v.tolist() for k, v in first_losses.items()},
      'problems': problems,
  }


def report(result: dict[str, Any]) -> str:
  lines = [f"Keras {result['keras']} ({result['backend']} backend) against ft.fit: {result['description']}, "
           f"{result['epochs']} epochs of {result['steps_per_epoch']} steps per call, {result['rounds']} rounds",
           f"  {'variant':12s} {'us/step':>9s} {'ratio':>7s}  {'compile s':>9s}  {'compiles/call':>13s}"]
  for name, r in result['variants'].items():
    lines.append(f"  {name:12s} {r['us_per_step']:9.1f} {r['ratio']:6.2f}x  {r['first_call_s']:9.2f}  "
                 f"{r['compilations_per_timed_call']:13g}")
  lines.append('  ' + ', '.join(f'{name} {value:.3f}x' for name, value in result['ratios'].items()))
  lines += [f'  PROBLEM: {p}' for p in result['problems']]
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='1 epoch per call, 2 rounds')
  parser.add_argument('--json', type=pathlib.Path, help='also write the results as JSON here')
  args = parser.parse_args(argv)
  result = measure(args.quick)
  print(report(result), flush=True)
  if args.json:
    args.json.write_text(json.dumps(result, indent=1) + '\n')
  return 1 if result['problems'] else 0


if __name__ == '__main__':
  sys.exit(main())
