"""Time to a trained model in a fresh process: what a learner waits for when running a cell.

    python benchmarks/fresh_process.py            # 3 processes per variant, alternated; 10 epochs
    python benchmarks/fresh_process.py --quick    # 1 process per variant, 1 epoch

Each measurement is a new Python process that imports what it needs
(untimed), prepares the digits (untimed), then times two things:

* build: the tiny MLP 64-32-32-10 and its Adam optimizer (1e-3);
* fit: training it for 10 epochs of 33 batches of 32, up to the trained
  parameters being ready.

The three variants:

* ``flaxtrain``: ``ft.MLP`` and ``nnx.Optimizer``, then
  ``ft.fit(model, optimizer, loader, epochs=10, progress=False)``;
* ``keras``: Keras 3 on its JAX backend (the ``[bench]`` extra): a
  ``keras.Sequential`` of the same layers, compiled with Adam(1e-3,
  epsilon=1e-8) and the accuracy metric, then
  ``model.fit(x, y, batch_size=32, epochs=10, shuffle=True, verbose=0)`` on
  1056 examples (33 full batches per epoch);
* ``pure``: ``ft.MLP`` split into a pytree of parameters, ``optax.adam`` and
  a hand-written loop over the same DataLoader around a donated ``jax.jit``
  step, fetching each epoch's losses once.

Inside each process the XLA compilations of the build and of the fit are
counted with ``ft.debug.count_compilations`` (count and seconds). The
variants run alternately (the order rotating each round); the report gives
medians per variant and the ratio of flaxtrain's median total to Keras's.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

VARIANTS = ('flaxtrain', 'keras', 'pure')
ROUNDS, EPOCHS = 3, 10
BATCH_SIZE, LEARNING_RATE = 32, 1e-3


def _child(variant: str, epochs: int) -> dict[str, Any]:
  """Runs in the fresh process: imports, data, then the timed build and fit."""
  if variant == 'keras':
    os.environ['KERAS_BACKEND'] = 'jax'
    import keras
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  import flaxtrain as ft
  imported = time.perf_counter()
  splits = ft.load_digits(seed=0)
  loader = ft.DataLoader(splits.train, BATCH_SIZE, seed=0)
  n = len(loader) * BATCH_SIZE
  x, y = loader.data['image'][:n], loader.data['label'][:n]
  prepared = time.perf_counter()

  with ft.debug.count_compilations() as build_compiled:
    begin = time.perf_counter()
    if variant == 'flaxtrain':
      model = ft.MLP(64, (32, 32), 10, rngs=nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    elif variant == 'keras':
      keras.utils.set_random_seed(0)
      model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(32, activation='relu'), keras.layers.Dense(32, activation='relu'),
                                keras.layers.Dense(10)])
      model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE, epsilon=1e-8),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=['accuracy'])
    else:
      model = ft.MLP(64, (32, 32), 10, rngs=nnx.Rngs(0))
      graphdef, state = nnx.split(model, nnx.Param)
      state_def, params, tx = jax.tree.structure(state), nnx.to_pure_dict(state), optax.adam(LEARNING_RATE)
      opt_state = tx.init(params)

      def loss_fn(params, batch):
        model = nnx.merge(graphdef, jax.tree.unflatten(state_def, jax.tree.leaves(params)))
        return ft.classification_loss(model, batch)

      @jax.jit
      def stack(*losses):
        return jnp.stack(losses)

      def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

      step = jax.jit(step, donate_argnums=(0, 1))
    built = time.perf_counter()

  with ft.debug.count_compilations() as fit_compiled:
    if variant == 'flaxtrain':
      history = ft.fit(model, optimizer, loader, epochs=epochs, progress=False)
      jax.block_until_ready(nnx.state(model, nnx.Param))
      last_loss = float(np.mean(history.steps()['loss'][-len(loader):]))
    elif variant == 'keras':
      history = model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=0)
      last_loss = float(history.history['loss'][-1])
    else:
      for epoch in range(epochs):
        losses = []
        for batch in loader.epoch(epoch):
          params, opt_state, loss = step(params, opt_state, batch)
          losses.append(loss)
        losses = np.asarray(stack(*losses))
        if not np.all(np.isfinite(losses)):
          raise FloatingPointError(f'non-finite loss in epoch {epoch}')
      jax.block_until_ready(params)
      last_loss = float(losses.mean())
    done = time.perf_counter()

  return {
      'variant': variant, 'epochs': epochs, 'steps': epochs * len(loader),
      'import_s': imported - STARTED, 'data_s': prepared - imported,
      'build_s': built - begin, 'fit_s': done - built, 'total_s': done - begin,
      'build_compilations': build_compiled.count, 'build_compile_s': sum(build_compiled.seconds),
      'fit_compilations': fit_compiled.count, 'fit_compile_s': sum(fit_compiled.seconds),
      'fit_compiled': sorted(set(fit_compiled.names)),
      'last_epoch_loss': last_loss,
  }


def keras_available() -> bool:
  import importlib.util
  return importlib.util.find_spec('keras') is not None


def measure(rounds: int, epochs: int) -> dict[str, Any]:
  """Runs ``rounds`` fresh processes per variant, alternated; returns every run and the medians."""
  variants = [v for v in VARIANTS if v != 'keras' or keras_available()]
  runs = {v: [] for v in variants}
  for r in range(rounds):
    shift = r % len(variants)
    for variant in variants[shift:] + variants[:shift]:
      out = subprocess.run([sys.executable, __file__, '--child', variant, '--epochs', str(epochs)],
                           capture_output=True, text=True, check=False,
                           env={**os.environ, 'KERAS_BACKEND': 'jax'})
      if out.returncode:
        raise RuntimeError(f'the {variant} process failed (status {out.returncode}):\n{out.stderr[-3000:]}')
      runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
  keys = ('total_s', 'build_s', 'fit_s', 'import_s', 'build_compilations', 'build_compile_s',
          'fit_compilations', 'fit_compile_s', 'last_epoch_loss')
  medians = {v: {k: statistics.median(run[k] for run in runs[v]) for k in keys} for v in variants}
  ratios = {'flaxtrain_vs_pure': medians['flaxtrain']['total_s'] / medians['pure']['total_s'],
            'flaxtrain_vs_keras': (medians['flaxtrain']['total_s'] / medians['keras']['total_s']
                                   if 'keras' in medians else None)}
  # Every variant must have trained: a finite loss, and after the full 10 epochs well below chance
  # (ln 10 = 2.30 on 10 classes; all three reach about 0.2-0.5 there).
  limit = 1.5 if epochs >= EPOCHS else float('inf')
  problems = [f"{v}: the last epoch's mean loss is {m['last_epoch_loss']}" for v, m in medians.items()
              if not m['last_epoch_loss'] < limit]
  result = {'rounds': rounds, 'epochs': epochs, 'runs': runs, 'medians': medians, 'ratios': ratios,
            'problems': problems}
  if 'keras' not in medians:
    result['note'] = 'keras is not installed (the [bench] extra): flaxtrain and pure only'
  return result


def report(result: dict[str, Any]) -> str:
  lines = [f"Time to a trained model in a fresh process ({result['epochs']} epochs; medians of "
           f"{result['rounds']} processes per variant, alternated; seconds after the imports)",
           f"  {'variant':10s} {'total':>7s} {'build':>7s} {'fit':>7s}  compilations (s): build, fit   imports"]
  for v, m in result['medians'].items():
    lines.append(f"  {v:10s} {m['total_s']:7.2f} {m['build_s']:7.2f} {m['fit_s']:7.2f}  "
                 f"{m['build_compilations']:g} ({m['build_compile_s']:.2f}), {m['fit_compilations']:g} "
                 f"({m['fit_compile_s']:.2f}){'':10s}{m['import_s']:.1f}")
  ratios = result['ratios']
  lines.append(f"  flaxtrain / pure {ratios['flaxtrain_vs_pure']:.2f}x"
               + (f", flaxtrain / keras {ratios['flaxtrain_vs_keras']:.2f}x" if ratios['flaxtrain_vs_keras'] else
                  f" ({result.get('note')})"))
  lines += [f'  PROBLEM: {p}' for p in result['problems']]
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='1 process per variant, 1 epoch')
  parser.add_argument('--json', type=pathlib.Path, help='also write the results as JSON here')
  parser.add_argument('--child', choices=VARIANTS, help=argparse.SUPPRESS)
  parser.add_argument('--epochs', type=int, default=EPOCHS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_child(args.child, args.epochs)))
    return 0
  result = measure(1 if args.quick else ROUNDS, 1 if args.quick else EPOCHS)
  print(report(result), flush=True)
  if args.json:
    args.json.write_text(json.dumps(result, indent=1) + '\n')
  return 1 if result['problems'] else 0


if __name__ == '__main__':
  sys.exit(main())
