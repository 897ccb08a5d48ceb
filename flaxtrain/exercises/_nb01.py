"""Exercises of notebook 01 (loss functions): a masked mean and cross-entropy from log_softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain.exercises import solutions
from flaxtrain.exercises._core import Fail, call, compare, exercise


def _values_and_mask():
  rng = np.random.default_rng(0)
  values = rng.uniform(0.5, 3.0, size=8).astype(np.float32)
  values[5:] = 40.0  # padding rows: their values are garbage and must not count
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  return values, mask


@exercise('01.1', 'the mean of per-example losses over the real examples (mask)',
          'a function masked_mean(values, mask)', solutions.masked_mean)
def check_masked_mean(answer):
  values, mask = _values_and_mask()
  cases = [
      ('with 3 padded entries (mask [1 1 1 1 1 0 0 0])', values, mask),
      ('with mask all ones', values[:5], np.ones(5, np.float32)),
      ('with the padding first (mask [0 0 1 1 1 1 1 1])', values[::-1].copy(), mask[::-1].copy()),
  ]
  for at, v, m in cases:
    got = call(answer, jnp.asarray(v), jnp.asarray(m))
    compare(got, solutions.masked_mean(v, m), what='your mean', at=at, rtol=1e-5, mistakes=[
        (np.mean(v * m), f'you divided by the batch size ({len(v)}) instead of the number of real examples '
                         f'(mask.sum() = {int(m.sum())}): padded entries then pull the mean towards 0'),
        (np.mean(v), 'the padded entries (mask 0) were counted: multiply by the mask (or use jnp.where) '
                     'before summing'),
        (np.sum(v * m), 'that is the masked sum: divide it by mask.sum()'),
        (np.mean(v[:int(m.sum())]), 'you averaged the first mask.sum() entries, but padding is not always at the '
                                    'end: weight each entry by the mask instead of slicing'),
    ])
  return 'padded entries are ignored and the mean divides by the number of real examples.'


def _logits():
  rng = np.random.default_rng(1)
  logits = (3.0 * rng.normal(size=(6, 4))).astype(np.float32)
  labels = rng.integers(0, 4, size=6).astype(np.int32)
  return logits, labels


def _wrong_cross_entropies(logits, labels):
  picked = lambda lp: np.take_along_axis(np.asarray(lp), labels[:, None], axis=-1)[:, 0]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return [
      (-np.sum(picked(log_probs)), 'that is the sum over the batch: take the mean, so the loss (and the '
                                   'gradient) does not grow with the batch size'),
      (np.mean(picked(log_probs)), 'the sign is flipped: the cross-entropy is MINUS the mean log-probability '
                                   'of the true class (it is never negative)'),
      (-np.mean(picked(jax.nn.log_softmax(logits, axis=0))), 'log_softmax normalised over the batch (axis 0); '
                                                             'each example is a distribution over the classes: '
                                                             'axis=-1'),
      (-np.mean(picked(logits)), 'the raw logit of the true class is not a log-probability: take '
                                 'jax.nn.log_softmax(logits) first'),
      (-np.mean(np.max(np.asarray(log_probs), axis=-1)), 'you took the largest log-probability, not the one of '
                                                         'the true class: pick it with the labels '
                                                         '(jnp.take_along_axis or one-hot)'),
  ]


@exercise('01.2', 'cross-entropy with integer labels, from log_softmax',
          'a function cross_entropy(logits, labels)', solutions.cross_entropy)
def check_cross_entropy(answer):
  logits, labels = _logits()
  got = call(answer, jnp.asarray(logits), jnp.asarray(labels))
  compare(got, solutions.cross_entropy(logits, labels), what='your loss', at='on 6 random examples of 4 classes',
          rtol=1e-5, mistakes=_wrong_cross_entropies(logits, labels))
  extreme = np.array([[0.0, 200.0, 0.0, 0.0]], np.float32)   # confidently wrong by a margin of 200
  got = call(answer, jnp.asarray(extreme), jnp.asarray([0], np.int32))
  if not np.all(np.isfinite(np.asarray(got))):
    raise Fail(f'for logits [0, 200, 0, 0] and label 0 your loss is {float(np.asarray(got))}, but it should be '
               f'about 200: take jax.nn.log_softmax, never the log of a softmax (softmax rounds e^-200 to 0)')
  compare(got, solutions.cross_entropy(extreme, np.array([0])), what='your loss',
          at='for logits [0, 200, 0, 0] and label 0', rtol=1e-5)
  return 'the mean of -log_softmax at the true class, finite even at a margin of 200.'
