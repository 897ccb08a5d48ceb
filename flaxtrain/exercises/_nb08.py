"""Exercises of notebook 08 (the complete training loop): an exact epoch mean, early stopping."""

from __future__ import annotations

import numpy as np

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


@exercise('08.1', 'the mean over all examples from per-batch means of different sizes',
          'a function epoch_mean(batch_means, batch_sizes) returning a float', solutions.epoch_mean)
def check_epoch_mean(answer):
  cases = [('3 batches of 64 and a last batch of 8', [0.9, 0.7, 0.8, 2.5], [64, 64, 64, 8]),
           ('batches of equal size', [0.4, 0.6], [32, 32]),
           ('one batch of 1 after one of 99', [1.0, 101.0], [99, 1])]
  for at, means, sizes in cases:
    got = call(answer, np.asarray(means, np.float32), np.asarray(sizes, np.int32))
    compare(got, solutions.epoch_mean(means, sizes), what='your epoch mean', at=f'for {at}', rtol=1e-5, mistakes=[
        (np.mean(means), 'that is the mean of the batch means, which gives the small last batch as much weight as '
                         'a full one: weight each batch mean by its number of examples'),
        (np.sum(np.asarray(means) * np.asarray(sizes)), 'that is the total; divide it by the number of examples'),
        (np.sum(np.asarray(means) * np.asarray(sizes)) / len(sizes),
         'you divided the total by the number of batches; divide it by the number of examples, sum(batch_sizes)'),
        (np.average(means, weights=1 / np.asarray(sizes)),
         'you weighted each batch by 1 / its size: weight it by its size, the number of examples it averages'),
    ])
  return 'each batch counts in proportion to its number of examples.'


@exercise('08.2', 'an early-stopping rule with patience',
          'a function should_stop(val_losses, patience) returning True or False', solutions.should_stop)
def check_should_stop(answer):
  cases = [
      ([1.0, 0.8, 0.7], 2),
      ([1.0, 0.8, 0.7, 0.75], 2),
      ([1.0, 0.8, 0.7, 0.75, 0.72], 2),
      ([1.0, 0.8, 0.7, 0.75, 0.72, 0.71], 3),
      ([1.0, 0.8, 0.7, 0.75, 0.72, 0.71, 0.70], 3),   # a tie is not an improvement
      ([1.0, 0.6, 0.9, 0.65, 0.64], 3),               # each epoch improves on the last, none on the best
      ([1.0, 0.9, 0.95, 0.8], 2),
      ([0.5], 1),
  ]
  wrong_rules = [
      (lambda losses, p: len(losses) > p and all(losses[i] >= losses[i - 1] for i in range(len(losses) - p,
                                                                                            len(losses))),
       'compare with the best loss so far, not with the previous epoch'),
      (lambda losses, p: _since_best(losses) > p, 'stop as soon as patience epochs have passed without a new best '
                                                  '(yours stops one epoch too late)'),
      (lambda losses, p: _since_best(losses) >= p - 1, 'stop only once patience epochs have passed without a new '
                                                       'best (yours stops one epoch too early)'),
      (lambda losses, p: len(losses) - 1 - (len(losses) - 1 - int(np.argmin(losses[::-1]))) >= p,
       'a tie with the best is not an improvement: the best is the FIRST epoch that reached it'),
  ]
  answers = []
  for losses, patience in cases:
    got = call(answer, list(losses), patience)
    if not isinstance(got, (bool, np.bool_)) and not (np.shape(got) == () and np.asarray(got).dtype == np.bool_):
      raise Fail(f'should_stop should return True or False, got {got!r:.60}')
    answers.append(bool(got))
  for (losses, patience), got in zip(cases, answers):
    if got == solutions.should_stop(losses, patience):
      continue
    best = int(np.argmin(losses))
    since = len(losses) - 1 - best
    at = (f'for val_losses {losses} and patience {patience}: you returned {got}, but the best loss '
          f'{losses[best]} was at epoch {best}, {since} epoch{"s" if since != 1 else ""} before the last')
    for rule, hint in wrong_rules:
      if answers == [bool(rule(list(l), p)) for l, p in cases]:
        raise Fail(f'{at}; {hint}')
    raise Fail(at)
  return 'stops exactly when the best loss is patience epochs old, and ignores improvements over the last epoch.'


def _since_best(losses):
  return len(losses) - 1 - int(np.argmin(losses))
