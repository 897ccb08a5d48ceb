"""Does saving a checkpoint with fit() stay as fast late in a long run as early on?

    python benchmarks/checkpoint_history.py            # 1k against 200k recorded steps
    python benchmarks/checkpoint_history.py --quick    # 1k against 20k: a smoke run

``fit`` stores the history beside each checkpoint. Rewriting it whole as JSON
at every save (about 150 bytes per step) would make each save slower as the
run grows: 30 MB and most of a second at 200k steps. flaxtrain appends only
the rows recorded since the previous save (``flaxtrain.history.HistoryLog``),
so a save should cost the same at any length.

Method: two runs of the same tiny MLP, one holding 1,000 recorded steps and
one holding 200,000, each with a writable checkpoint directory (the history
of each was first written once, untimed). Then, in interleaved rounds, each
run records 100 more steps and saves a checkpoint the way ``fit`` does, with
the same public pieces (``HistoryLog.write`` appends the new rows, then
``Checkpoints.save`` computes checksums, writes through orbax and rotates);
the time of one save is the median over rounds. The script prints both
medians and their ratio, and the cost of the old way (one ``json.dumps`` of
the whole history) for reference, and exits with status 1 if the ratio
exceeds 1.5. It also prints what the best checkpoint's separate copy costs:
a save with ``best=True`` against one without, on the short run. Only ratios
measured side by side in this process are meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
from flax import nnx

import flaxtrain as ft
from flaxtrain.history import HistoryLog

TARGET = 1.5  # save time at the long length / at 1k steps, at most
NEW_ROWS = 100  # steps recorded between two saves


def _row(step: int) -> dict[str, float]:
  rng = np.random.default_rng(step)
  return {'loss': float(rng.random()), 'grad_norm': float(rng.random()), 'learning_rate': 1e-3,
          'accuracy': float(rng.random())}


class Run:
  """What fit saves: a model, its optimizer, the history and its log, a checkpoint directory."""

  def __init__(self, directory: pathlib.Path, steps: int):
    self.model = ft.MLP(64, (32,), 10, rngs=nnx.Rngs(0))
    self.optimizer = nnx.Optimizer(self.model, ft.make_optimizer('adam', 1e-3), wrt=nnx.Param)
    self.checkpoints = ft.Checkpoints(directory, keep=3)
    self.history = ft.History()
    self.log_file = HistoryLog(self.checkpoints.directory / 'history')
    for step in range(steps):
      self.history.record_step(step, _row(step))
    self.step = steps
    self.save()

  def save(self, best: bool = False) -> None:
    metadata = {'step': self.step, 'history': self.log_file.write(self.history)}  # appends only the new rows
    self.checkpoints.save(self.step, self.model, self.optimizer, metadata=metadata, best=best)

  def close(self) -> None:
    self.log_file.close()
    self.checkpoints.close()


def timed_save(run: Run, best: bool = False) -> float:
  """Records NEW_ROWS steps, then times one checkpoint save."""
  for _ in range(NEW_ROWS):
    run.history.record_step(run.step, _row(run.step))
    run.step += 1
  run.history.flush()  # recording is not part of the save
  start = time.perf_counter()
  run.save(best)
  return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='20k instead of 200k steps, fewer rounds')
  parser.add_argument('--rounds', type=int, default=None)
  args = parser.parse_args(argv)
  short, long = 1_000, (20_000 if args.quick else 200_000)
  rounds = args.rounds or (3 if args.quick else 9)
  with tempfile.TemporaryDirectory() as root:
    runs = {n: Run(pathlib.Path(root) / str(n), n) for n in (short, long)}
    for run in runs.values():  # warm-up: the first timed-path call of each
      timed_save(run)
    times = {n: [] for n in runs}
    best_times = {False: [], True: []}
    for index in range(rounds):
      order = list(runs) if index % 2 == 0 else list(runs)[::-1]  # alternate who goes first
      for n in order:
        times[n].append(timed_save(runs[n]))
      for best in ((False, True) if index % 2 == 0 else (True, False)):
        best_times[best].append(timed_save(runs[short], best))
    start = time.perf_counter()
    whole = json.dumps(runs[long].history.state_dict())
    rewrite = time.perf_counter() - start
    for run in runs.values():
      run.close()
  median = {n: statistics.median(t) for n, t in times.items()}
  ratio = median[long] / median[short]
  print(f'checkpoint save with the history, median of {rounds} rounds ({NEW_ROWS} new steps per save):')
  for n in runs:
    print(f'  {n:>7,} steps recorded: {1e3 * median[n]:7.1f} ms per save')
  print(f'  ratio {long:,} / {short:,}: {ratio:.2f} (target <= {TARGET})')
  print(f'  for reference, rewriting the whole history as JSON at {long:,} steps: '
        f'{len(whole) / 1e6:.1f} MB, {1e3 * rewrite:.0f} ms for json.dumps alone')
  plain, with_best = (statistics.median(best_times[b]) for b in (False, True))
  print(f'  the best checkpoint as a separate copy: {1e3 * plain:.1f} ms per save without it, '
        f'{1e3 * with_best:.1f} ms with it ({with_best / plain:.2f}x), at {short:,} steps')
  if ratio > TARGET:
    print(f'FAILED: saving at {long:,} steps is {ratio:.2f}x slower than at {short:,} (> {TARGET})')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
