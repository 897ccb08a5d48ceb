"""Does a process that calls ft.fit many times, each on a new model, stay flat?

    python benchmarks/many_fits.py                 # 200 calls; exits 1 when a bound is missed
    python benchmarks/many_fits.py --calls 6       # a smoke run (bounds reported, not enforced)
    python benchmarks/many_fits.py --json out.json

A notebook that is re-run, or a sweep over learning rates, calls ``ft.fit``
again and again on new models of one structure. Each call here builds a new
``ft.MLP(64, (32, 32), 10)`` and its Adam optimizer and trains it for one
epoch of a few batches, with no progress bar. The script records, for every
call, the XLA compilations seen inside it (``ft.debug.count_compilations``:
model building and ``fit`` together) and, at a few calls, the process's
resident memory (``VmRSS`` of ``/proc/self/status``, or ``ru_maxrss`` where
there is no ``/proc``), read after ``gc.collect()`` so that garbage waiting
for the cycle collector does not count.

Two bounds, both checked in a full run of at least 200 calls:

* no compilation in any call after the first: a model of a structure already
  compiled reuses the compiled step, evaluation and logging functions;
* resident memory grows by at most ``RSS_GROWTH_MB`` (50 MB) from call
  ``RSS_BASE_CALL`` (20) to the last call. The first calls are left out
  because they legitimately grow the process: JAX's compilation caches, XLA's
  thread pools and the allocator's arenas fill up once. After that, a call
  that keeps anything alive keeps it 180 times: one compiled step per call
  (about 1-2 MB of executable and traced state each) would add 180-350 MB,
  while 50 MB over 180 calls allows under 0.3 MB per call of allocator noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import resource
import sys
import time
from typing import Any

import optax
from flax import nnx

import flaxtrain as ft

CALLS = 200
RSS_BASE_CALL = 20
RSS_GROWTH_MB = 50.0
BATCHES, BATCH_SIZE = 4, 32  # one epoch of 4 batches per call


def rss_mb() -> float:
  """Resident memory of this process in MB (VmRSS; peak ru_maxrss where /proc is missing)."""
  try:
    for line in pathlib.Path('/proc/self/status').read_text().splitlines():
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024 * 1024 if sys.platform == 'darwin' else 1024)  # bytes on macOS, kB on Linux


def checkpoints(calls: int) -> list[int]:
  """The calls after which memory is read: 1, 20, 50, 100, 200 and the last (those <= calls)."""
  return sorted({c for c in (1, 2, RSS_BASE_CALL, 50, 100, 150, 200, calls) if c <= calls})


def run(calls: int) -> dict[str, Any]:
  """Calls fit ``calls`` times on new models; returns compilations per call and memory at checkpoints."""
  splits = ft.load_digits(seed=0)
  data = {name: array[:BATCHES * BATCH_SIZE] for name, array in splits.train.items()}
  loader = ft.DataLoader(data, BATCH_SIZE, seed=0)
  read_at = set(checkpoints(calls))
  compilations, compile_s, seconds, rss, compiled_later = [], [], [], {}, set()
  losses = []
  gc.collect()
  rss_before = rss_mb()
  for call in range(1, calls + 1):
    begin = time.perf_counter()
    with ft.debug.count_compilations() as compiled:
      model = ft.MLP(64, (32, 32), 10, rngs=nnx.Rngs(call))
      optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
      history = ft.fit(model, optimizer, loader, epochs=1, progress=False)
    seconds.append(time.perf_counter() - begin)
    compilations.append(compiled.count)
    compile_s.append(sum(compiled.seconds))
    if call > 1:
      compiled_later.update(compiled.names)
    losses.append(float(history.steps()['loss'][-1]))
    del model, optimizer, history
    if call in read_at:
      gc.collect()
      rss[call] = rss_mb()
  later = compilations[1:]
  base = rss.get(RSS_BASE_CALL)
  growth = rss[calls] - base if base is not None else None
  return {
      'calls': calls, 'batches_per_call': BATCHES, 'batch_size': BATCH_SIZE,
      'compilations_per_call': compilations, 'compile_s_per_call': compile_s, 'seconds_per_call': seconds,
      'first_call_compilations': compilations[0], 'first_call_compile_s': compile_s[0],
      'compilations_after_first': int(sum(later)),
      'calls_that_compiled_after_first': [i + 2 for i, n in enumerate(later) if n],
      'compiled_after_first': sorted(compiled_later),
      'median_call_s_after_first': sorted(seconds[1:])[len(seconds[1:]) // 2] if later else None,
      'rss_mb_before': rss_before, 'rss_mb': {str(k): v for k, v in sorted(rss.items())},
      'rss_base_call': RSS_BASE_CALL, 'rss_growth_mb': growth, 'rss_growth_limit_mb': RSS_GROWTH_MB,
      'all_losses_finite': all(x == x and abs(x) != float('inf') for x in losses),
      'enforced': calls >= CALLS,
      **({} if growth is not None else
         {'note': f'{calls} calls: the memory bound is read from call {RSS_BASE_CALL} on'}),
  }


def met(result: dict[str, Any]) -> dict[str, bool]:
  """Whether each bound holds (the memory bound only when the run reached RSS_BASE_CALL)."""
  growth = result['rss_growth_mb']
  return {'no_recompilation': result['compilations_after_first'] == 0,
          'flat_memory': growth is not None and growth <= result['rss_growth_limit_mb']}


def report(result: dict[str, Any]) -> str:
  lines = [f"{result['calls']} fit calls, each on a new ft.MLP(64, (32, 32), 10), "
           f"1 epoch of {result['batches_per_call']} batches of {result['batch_size']}",
           f"  compilations: first call {result['first_call_compilations']} "
           f"({result['first_call_compile_s']:.2f} s); after it {result['compilations_after_first']} in all"
           + (f" (calls {result['calls_that_compiled_after_first'][:10]}"
              f"{'...' if len(result['calls_that_compiled_after_first']) > 10 else ''}: "
              f"{', '.join(result['compiled_after_first'][:8])})"
              if result['compilations_after_first'] else ''),
           f"  seconds per call after the first (median): {result['median_call_s_after_first'] or 0:.3f}",
           '  resident memory (MB) after call: ' + ', '.join(f'{k}: {v:.0f}' for k, v in result['rss_mb'].items())
           + f" (before the first: {result['rss_mb_before']:.0f})"]
  if result['rss_growth_mb'] is not None:
    lines.append(f"  growth from call {result['rss_base_call']} to {result['calls']}: "
                 f"{result['rss_growth_mb']:.1f} MB (limit {result['rss_growth_limit_mb']:.0f} MB)")
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--calls', type=int, default=CALLS, help=f'fit calls (default {CALLS}; fewer: not enforced)')
  parser.add_argument('--json', type=pathlib.Path, help='also write the results as JSON here')
  args = parser.parse_args(argv)
  if args.calls < 1:
    parser.error(f'--calls: expected a positive number, got {args.calls}')
  result = run(args.calls)
  result['met'] = met(result)
  print(report(result))
  if args.json:
    args.json.write_text(json.dumps(result, indent=1) + '\n')
  if not result['all_losses_finite']:
    print('a fit call ended with a non-finite loss')
    return 1
  if result['enforced'] and not all(result['met'].values()):
    print('bounds missed:', ', '.join(k for k, v in result['met'].items() if not v))
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
