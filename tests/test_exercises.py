"""ft.exercises: every model answer passes its check, typical mistakes get their hint."""

import math
import pathlib

import jax
import jax.numpy as jnp
import nbformat
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxtrain as ft
from flaxtrain.exercises import solutions as S
from flaxtrain.exercises._core import REGISTRY

IDS = sorted(REGISTRY)
NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / 'notebooks').glob('[0-9][0-9]_*.ipynb'))


def outcome(exercise_id, answer):
  return ft.exercises.check(exercise_id, answer, quiet=True)


@pytest.mark.parametrize('exercise_id', IDS)
def test_model_answer_passes(exercise_id, capsys):
  result = ft.exercises.check(exercise_id, REGISTRY[exercise_id].solution)
  assert result.passed and result.attempted, result.message
  assert capsys.readouterr().out.startswith(f'{exercise_id} passed: ')


@pytest.mark.parametrize('exercise_id', IDS)
def test_stub_is_not_attempted(exercise_id):
  def raises(*args, **kwargs):
    raise NotImplementedError

  def ellipsis_body(*args, **kwargs):
    ...

  for stub in (raises, ellipsis_body):
    result = outcome(exercise_id, stub)
    assert not result.passed and not result.attempted
    assert result.message.startswith(f'{exercise_id} not attempted yet'), result.message


def test_every_notebook_has_exercises():
  numbers = {path.name[:2] for path in NOTEBOOKS} - {'00'}
  assert {key.split('.')[0] for key in IDS} == numbers
  assert all(2 <= sum(key.startswith(f'{n}.') for key in IDS) <= 3 for n in numbers)


def test_bad_id_and_bad_answer_are_clear_errors():
  with pytest.raises(ValueError, match=r"exercise_id: expected one of 01\.1, 01\.2, .*got '4\.1'"):
    ft.exercises.check('4.1', S.masked_mean)
  with pytest.raises(TypeError, match=r'answer: exercise 01\.1 expects a function masked_mean\(values, mask\); '
                                      r'got float'):
    ft.exercises.check('01.1', 0.5)
  with pytest.raises(ValueError, match='exercise_id'):
    ft.exercises.solution('99.9')


def test_errors_in_the_answer_become_hints():
  def broken(values, mask):
    return values.nonexistent

  result = outcome('01.1', broken)
  assert not result.passed and result.attempted
  assert "your code raised AttributeError: " in result.message and "has no attribute 'nonexistent'" in result.message


def test_results_of_an_unexpected_kind_become_hints():
  result = outcome('02.1', lambda params, x, y: {'w': 'not a number', 'b': object()})
  assert not result.passed and result.attempted
  assert result.message.startswith('02.1 not passed: ')
  assert "mse_grads(params, x, y)" in result.message or "gradient['w']" in result.message, result.message


def test_solution_prints_the_model_answer(capsys):
  ft.exercises.solution('04.1')
  out = capsys.readouterr().out
  assert out.startswith('# Model answer to exercise 04.1') and 'optax.join_schedules' in out
  assert set(ft.exercises.ids()) == set(IDS)


# One test per exercise: typical wrong answers and the substring of the hint each must get.
def _leaves_finite(leaves):
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _unscaled(g, s):
  return jax.tree.map(lambda x: x / s, g)


def _python_loop(step, params, stacked, to_host=False):
  losses = []
  for k in range(len(stacked['x'])):
    params, loss = step(params, {key: value[k] for key, value in stacked.items()})
    losses.append(float(loss) if to_host else loss)
  return params, jnp.stack(losses) if not to_host else np.array(losses)


def _device_slice_raising(message):
  def device_slice(global_batch, num_devices, device_index):
    if global_batch % num_devices:
      raise ValueError(message)
    return S.device_slice(global_batch, num_devices, device_index)
  return device_slice


def _device_slice_asserting(global_batch, num_devices, device_index):
  assert global_batch % num_devices == 0, f'{global_batch} % {num_devices} != 0'
  return S.device_slice(global_batch, num_devices, device_index)


def _channel_scale(w, divide_by=127):
  amax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
  return jnp.where(amax > 0, amax / divide_by, 1.0)


def _side_by_side(step, params, stacked):
  """Every step from the initial params (vmap over the batches), as a learner might try instead of a scan."""
  return params, jax.vmap(step, in_axes=(None, 0))(params, stacked)[1]


WRONG = {
    '01.1': [
        (lambda v, m: jnp.mean(v * m), 'divided by the batch size (8) instead of the number of real examples'),
        (lambda v, m: jnp.mean(v), 'the padded entries (mask 0) were counted'),
        (lambda v, m: jnp.sum(v * m), 'that is the masked sum'),
        (lambda v, m: jnp.mean(v[:int(m.sum())]), 'padding is not always at the end'),
    ],
    '01.2': [
        (lambda z, y: -jnp.mean(jnp.log(jax.nn.softmax(z))[jnp.arange(len(y)), y]), 'never the log of a softmax'),
        (lambda z, y: -jnp.sum(jax.nn.log_softmax(z)[jnp.arange(len(y)), y]), 'that is the sum over the batch'),
        (lambda z, y: jnp.mean(jax.nn.log_softmax(z)[jnp.arange(len(y)), y]), 'the sign is flipped'),
        (lambda z, y: -jnp.mean(jax.nn.log_softmax(z, axis=0)[jnp.arange(len(y)), y]), 'normalised over the batch'),
        (lambda z, y: -jnp.mean(z[jnp.arange(len(y)), y]), 'the raw logit of the true class is not a log-probability'),
    ],
    '02.1': [
        (lambda p, x, y: {'w': x.T @ (x @ p['w'] + p['b'] - y) / len(y), 'b': jnp.mean(x @ p['w'] + p['b'] - y)},
         'half the right value: the derivative of r ** 2 is 2 * r'),
        (lambda p, x, y: {'w': 2 * x.T @ (x @ p['w'] + p['b'] - y), 'b': 2 * jnp.sum(x @ p['w'] + p['b'] - y)},
         'too large by the number of examples'),
        (lambda p, x, y: {'w': 2 * x.T @ (y - x @ p['w'] - p['b']) / len(y), 'b': 2 * jnp.mean(y - x @ p['w'] - p['b'])},
         'the sign is flipped'),
        (lambda p, x, y: {'w': 2 * x.T @ (x @ p['w'] - y) / len(y), 'b': 2 * jnp.mean(x @ p['w'] - y)},
         'b is missing from the residual'),
    ],
    '03.1': [
        (lambda g, m, lr, mu: (jax.tree.map(lambda g, m: -lr * (mu * m + (1 - mu) * g), g, m),
                               jax.tree.map(lambda g, m: mu * m + (1 - mu) * g, g, m)),
         "At update 1: that is the averaging form"),
        (lambda g, m, lr, mu: (jax.tree.map(lambda g, m: lr * (g + mu * m), g, m),
                               jax.tree.map(lambda g, m: g + mu * m, g, m)), 'the sign is flipped'),
        (lambda g, m, lr, mu: (g, m), "updates['w'] at update 1: at index [0, 0] the value is 0.12573, but it should be "
                                      '-0.012573 (6 of 6 entries differ)'),
        (lambda g, m, lr, mu: (jax.tree.map(lambda g, m: -(mu * m + lr * g), g, m),
                               jax.tree.map(lambda g, m: mu * m + lr * g, g, m)),
         'the learning rate is folded into the velocity'),
        (lambda g, m, lr, mu: (jax.tree.map(lambda g, m: -lr * (g + mu * m), g, m), m),
         'you returned the velocity you were given'),
        (lambda g, m, lr, mu: (jax.tree.map(lambda g: -lr * g, g), jax.tree.map(lambda g, m: g + mu * m, g, m)),
         'that is plain SGD'),
    ],
    '03.2': [
        (lambda g, m, v, t, p, lr=1e-3, wd=1e-2: (
            -lr * ((b1m := 0.9 * m + 0.1 * g) / (jnp.sqrt(b2v := 0.999 * v + 0.001 * g ** 2) + 1e-8) + wd * p),
            b1m, b2v), 'At update t = 1: the bias correction is missing'),
        (lambda g, m, v, t, p, lr=1e-3, wd=1e-2: S.adamw_step(g, m, v, t - 1, p),
         'at update t = 1 your update holds NaN or inf: t counts from 1'),
        (lambda g, m, v, t, p, lr=1e-3, wd=1e-2: S.adamw_step(g, m, v, t, p, weight_decay=0.0),
         'the weight decay is missing'),
        (lambda g, m, v, t, p, lr=1e-3, wd=1e-2: S.adamw_step(g + wd * p, m, v, t, p, weight_decay=0.0),
         'that is Adam with an L2 term'),
        (lambda g, m, v, t, p, lr=1e-3, wd=1e-2: (lambda u, m, v: (u - wd * p + lr * wd * p, m, v))(
            *S.adamw_step(g, m, v, t, p)), 'the decay should be multiplied by the learning rate too'),
    ],
    '04.1': [
        (lambda p, w, s, d: optax.join_schedules(
            [optax.linear_schedule(0.0, p, w), optax.constant_schedule(p), optax.linear_schedule(p, 0.0, d)], [w, s]),
         'the boundaries are step numbers counted from 0, not phase lengths'),
        (lambda p, w, s, d: optax.join_schedules(
            [optax.linear_schedule(0.0, p, w), optax.constant_schedule(p),
             optax.linear_schedule(p, 0.0, d, transition_begin=w + s)], [w, w + s]),
         'at step 301 (decay; peak 0.001, warmup 100, hold 200, decay 100) your schedule gives 0.001, but it should '
         'give 0.00099: join_schedules already hands'),
        (lambda p, w, s, d: optax.join_schedules(
            [optax.linear_schedule(0.0, p, w - 1), optax.constant_schedule(p), optax.linear_schedule(p, 0.0, d)],
            [w, w + s]), 'at step 1 (warmup; peak 0.001, warmup 100, hold 200, decay 100) your schedule gives '
                         '1.0101e-05, but it should give 1e-05: the warmup reaches the peak one step early'),
        (lambda p, w, s, d: optax.join_schedules(
            [optax.linear_schedule(0.0, p, w), optax.constant_schedule(p), optax.linear_schedule(p, 0.0, d)],
            [w + 1, w + s + 1]), 'each boundary is one step late'),
    ],
    '04.2': [
        (lambda p, w: (lambda s: p * s / w if s < w else p * (w / s) ** 0.5), 'jnp.where'),
        (lambda p, w: (lambda s: jnp.where(s < w, p * (s // w), p * jnp.sqrt(w / jnp.maximum(s, 1)))),
         'integer division'),
        (lambda p, w: (lambda s: p * jnp.sqrt(w / jnp.maximum(s, 1.0))), 'the warmup is missing'),
        (lambda p, w: (lambda s: jnp.where(s < w, p * s / w, p / jnp.sqrt(jnp.maximum(s, 1.0)))),
         'peak / sqrt(step) drops at the boundary'),
    ],
    '05.1': [
        (lambda g: sum(jnp.linalg.norm(x) for x in jax.tree.leaves(g)), 'that is the sum of the norms'),
        (lambda g: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)), 'the square root is missing'),
        (lambda g: jnp.linalg.norm(jax.tree.leaves(g)[0]), 'only the first array counted'),
        (lambda g: jnp.linalg.norm(jax.tree.leaves(g)[-1]), 'only the last array counted'),
        (lambda g: jnp.sqrt(jnp.mean(jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) ** 2)),
         'root-MEAN-square'),
        (lambda g: jnp.linalg.norm(jnp.concatenate(jax.tree.leaves(g))), 'the arrays of the tree have different shapes'),
    ],
    '05.2': [
        (lambda g, c: jax.tree.map(lambda x: x * jnp.minimum(1.0, c / jnp.linalg.norm(x)), g),
         'each array was clipped by its own norm'),
        (lambda g, c: jax.tree.map(lambda x: jnp.clip(x, -c, c), g), 'that clips each value (like optax.clip)'),
        (lambda g, c: jax.tree.map(lambda x: x * c / optax.tree.norm(g), g),
         'below max_norm 1: the gradient was scaled to norm max_norm although it was already shorter'),
    ],
    '06.1': [
        (lambda g, s: (jax.tree.map(lambda x: x * s, g), jnp.bool_(True)), 'you multiplied by the loss scale'),
        (lambda g, s: (_unscaled(g, s), ~jnp.any(jnp.array([jnp.isnan(x).any() for x in jax.tree.leaves(g)]))),
         "with an inf in the first leaf, grads['decoder'][0]['kernel'] your finite is True, but it should be False: "
         'an inf is not finite either'),
        (lambda g, s: (_unscaled(g, s), jnp.all(jnp.isfinite(jax.tree.leaves(g)[-1]))),
         "your finite is True, but it should be False: only the last leaf is looked at"),
        (lambda g, s: (_unscaled(g, s), jnp.all(jnp.isfinite(jax.tree.leaves(g)[0]))),
         'your finite is True, but it should be False: only the first leaf is looked at'),
        (lambda g, s: (_unscaled(g, s), _leaves_finite([g['out'], g['encoder']['kernel']])),
         "with an inf in the first leaf, grads['decoder'][0]['kernel'] your finite is True"),
        (lambda g, s: (_unscaled(g, s), jnp.all(jnp.isfinite(jnp.array(jax.tree.leaves(g))))),
         'reduce each leaf to one boolean first'),
        (lambda g, s: (_unscaled(g, s), [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)]),
         'finite should be one boolean (a scalar'),
        (lambda g, s: (_unscaled(g, s), jnp.bool_(True)), 'finite is True whatever the gradients hold'),
    ],
    '06.2': [
        (lambda scale, good, finite, n: (scale * 2, 0) if finite else (scale / 2, 0),
         'at step 0 (scale 1024, good_steps 0, finite=True, growth_interval 3): your scale grew to 2048, but it '
         'should grow only after growth_interval'),
        (lambda scale, good, finite, n: ((scale * 2, 0) if good + 1 > n else (scale, good + 1)) if finite
         else (scale / 2, 0), 'this is the 3rd finite step in a row, so the scale should double'),
        (lambda scale, good, finite, n: (scale / 2, good) if not finite else S.next_loss_scale(scale, good, True, n),
         'after a non-finite step good_steps must restart at 0'),
        (lambda scale, good, finite, n: (scale, 0) if not finite else S.next_loss_scale(scale, good, True, n),
         'after a non-finite step the scale must shrink'),
    ],
    '07.1': [
        (lambda t: [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(t) if jnp.isnan(x).any()],
         "holds an inf: test with jnp.isfinite"),
        (lambda t: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)],
         "with no NaN or inf: you returned ["),
        (lambda t: [str(p) for p, x in jax.tree_util.tree_leaves_with_path(t) if not jnp.isfinite(x).all()],
         'str(path) prints the key objects'),
        (lambda t: [p for p, x in jax.tree_util.tree_leaves_with_path(t) if not jnp.isfinite(x).all()],
         'you returned the paths as tuples of keys'),
        (lambda t: [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(t)
                    if not jnp.isfinite(x).all()][:1], 'you returned only the first path'),
    ],
    '07.2': [
        (lambda x: float(jnp.mean(x <= 0)), 'that is the fraction of ENTRIES <= 0'),
        (lambda x: float(jnp.mean(jnp.all(x < 0, axis=0))), 'test x <= 0, not x < 0'),
        (lambda x: float(jnp.mean(jnp.any(x <= 0, axis=0))), 'not jnp.any'),
        (lambda x: float(jnp.mean(jnp.all(x <= 0, axis=1))), 'reduce over axis 0'),
    ],
    '08.1': [
        (lambda m, n: float(np.mean(m)), 'that is the mean of the batch means'),
        (lambda m, n: float(np.sum(m * n)), 'that is the total'),
        (lambda m, n: float(np.sum(m * n) / len(n)), 'you divided the total by the number of batches'),
        (lambda m, n: float(np.average(m, weights=1 / n)), 'you weighted each batch by 1 / its size'),
    ],
    '08.2': [
        (lambda losses, p: len(losses) - 1 - int(np.argmin(losses)) > p, 'one epoch too late'),
        (lambda losses, p: len(losses) - 1 - int(np.argmin(losses)) >= p - 1, 'one epoch too early'),
        (lambda losses, p: len(losses) > p and all(losses[i] >= losses[i - 1] for i in range(len(losses) - p,
                                                                                               len(losses))),
         'compare with the best loss so far, not with the previous epoch'),
        (lambda losses, p: len(losses) - 1 - (len(losses) - 1 - int(np.argmin(losses[::-1]))) >= p,
         'a tie with the best is not an improvement'),
    ],
    '09.1': [
        (lambda bs: jax.tree.map(lambda *a: np.concatenate(a), *bs), 'np.concatenate joins the batches'),
        (lambda bs: jax.tree.map(np.stack, bs), 'jax.tree.map(f, batches) maps over every leaf of the list'),
        (lambda bs: jax.tree.map(lambda *a: np.stack(a, axis=1), *bs), 'the steps must be the LEADING axis'),
        (lambda bs: jax.tree.map(lambda *a: np.stack(a).astype(np.float32), *bs), "it should keep int32"),
    ],
    '09.2': [
        (lambda step, params, stacked: _python_loop(step, params, stacked), 'Use jax.lax.scan'),
        (lambda step, params, stacked: _python_loop(jax.jit(step), params, stacked),
         'the results are right, but there is no scan in your function'),
        (lambda step, params, stacked: _python_loop(jax.jit(step), params, stacked, to_host=True),
         'the results are right, but run_steps cannot be traced by JAX'),
        (lambda step, params, stacked: (lambda p, l: (p, l[-1]))(*jax.lax.scan(step, params, stacked)),
         'not only the last'),
        (lambda step, params, stacked: jax.lax.scan(step, params, stacked)[::-1], 'the pair is swapped'),
        (_side_by_side, 'every step started from the initial params'),
        (lambda step, params, stacked: (params, jnp.zeros(5)),
         'your losses for 5 steps of a linear model: at step 0 the value is 0, but it should be'),
    ],
    '10.1': [
        (lambda n, d, i: slice(i, n, d), 'your slice is strided'),
        (lambda n, d, i: slice(i * (n // d), (i + 1) * (n // d)),
         'raise a ValueError (naming both numbers) instead of returning a slice'),
        (_device_slice_raising('cannot split the batch evenly'),
         'your ValueError says "cannot split the batch evenly", which does not name 10 and 4'),
        (_device_slice_raising('global_batch 10 is not divisible'), 'which does not name 4'),
        (lambda n, d, i: slice(i * (n // d), (i + 1) * (n // d) - 1) if n % d == 0 else S.device_slice(n, d, i),
         'your slice stops one row early'),
        (lambda n, d, i: slice(i * d, (i + 1) * d) if n % d == 0 else S.device_slice(n, d, i),
         'as many as there are devices'),
        (_device_slice_asserting, 'your function raised AssertionError; raise a ValueError'),
    ],
    '10.2': [
        (lambda mesh: NamedSharding(mesh, P()), 'replicates the batch on every device'),
        (lambda mesh: NamedSharding(mesh, P(None, 'data')), "does not split the first (batch) axis over 'data'"),
        (lambda mesh: P('data'), 'you returned the PartitionSpec'),
        (lambda mesh: NamedSharding(mesh, P('batch')), "this mesh has one axis, called 'data'"),
    ],
    '11.1': [
        (lambda n: jnp.triu(jnp.ones((n, n), bool)), 'the mask is transposed'),
        (lambda n: jnp.tril(jnp.ones((n, n), bool), -1), 'the diagonal is False'),
        (lambda n: jnp.triu(jnp.ones((n, n), bool), 1), 'the mask is inverted'),
        (lambda n: jnp.ones((n, n), bool), 'every position sees every other'),
    ],
    '11.2': [
        (lambda t: (t[:, 1:], t[:, :-1]), 'inputs and targets are swapped'),
        (lambda t: (t[:, :-1], t[:, :-1]), 'your targets equal your inputs'),
        (lambda t: (t[:-1], t[1:]), 'you shifted along the batch (axis 0)'),
        (lambda t: (t, np.roll(t, -1, axis=1)), 'np.roll wraps the first token around'),
    ],
    '12.1': [
        (lambda n, f, seed: (np.arange(n - round(n * f)), np.arange(n - round(n * f), n)), 'shuffle first'),
        (lambda n, f, seed: tuple(np.split(np.random.permutation(n), [n - round(n * f)])),
         'a second call with the same seed gave a different split'),
        (lambda n, f, seed: tuple(np.split(np.random.default_rng(0).permutation(n), [n - round(n * f)])),
         'seeds 0 and 1 gave the same validation set'),
        (lambda n, f, seed: tuple(np.split(np.random.default_rng(seed).permutation(n), [n - int(n * f)])),
         'for n=48, val_fraction=0.2, seed 0: your split has 39 training and 9 validation indices; it should have 38 '
         'and 10: int() truncates 9.6 to 9'),
        (lambda n, f, seed: tuple(np.split(np.random.default_rng(seed).permutation(n), [n - math.ceil(n * f)])),
         'for n=47, val_fraction=0.2, seed 0: your split has 37 training and 10 validation indices; it should have 38 '
         'and 9: math.ceil rounds 9.4 up to 10'),
        (lambda n, f, seed: (np.random.default_rng(seed).integers(0, n, n - round(n * f)),
                             np.random.default_rng(seed + 1).integers(0, n, round(n * f))),
         'every index 0..49 should appear exactly once'),
    ],
    '13.1': [
        (lambda w: (lambda s: (jnp.round(w / s).astype(jnp.int8), s))(jnp.max(jnp.abs(w)) / 127),
         'your scale is one number for the whole kernel'),
        (lambda w: (lambda s: (jnp.round(w / s).astype(jnp.int8), s))(jnp.max(jnp.abs(w), axis=0) / 127),
         'your scale has shape (3, 2, 4); it should have one entry per output channel'),
        (lambda w: (lambda s: ((w / s).astype(jnp.int8), s))(_channel_scale(w)), 'astype(int8) alone truncates'),
        (lambda w: (lambda s: (jnp.round(w / s), s))(_channel_scale(w)), 'store it as int8'),
        (lambda w: (lambda s: (jnp.round(w / s).astype(jnp.int8), s))(_channel_scale(w, 128)),
         'the scale is max|w| / 127'),
    ],
    '13.2': [
        (lambda predict, x, b: np.concatenate([predict(x[i:i + b]) for i in range(0, len(x), b)]),
         'for 10 images in batches of 4: predict was called with batches of [4, 4, 2]'),
        (lambda predict, x, b: np.concatenate([predict(x[i:i + 1]) for i in range(len(x))]),
         'times with one image each'),
        (lambda predict, x, b: np.concatenate([predict(x[i:i + b]) for i in range(0, len(x) - len(x) % b, b)]),
         'predict was called 2 times; 3 calls'),
        (lambda predict, x, b: np.concatenate([predict(np.concatenate([x[i:i + b], np.zeros_like(x[:b])])[:b])
                                               for i in range(0, len(x), b)]),
         'the outputs of the padding rows were kept'),
    ],
    '12.2': [
        (lambda z, y, m: int(jnp.sum(jnp.argmax(z, -1) == y)), 'the padded rows were counted'),
        (lambda z, y, m: float(jnp.sum((jnp.argmax(z, -1) == y) * m) / jnp.sum(m)), 'that is the accuracy'),
        (lambda z, y, m: jnp.sum((jnp.argmax(z, -1) == y) * m), 'your count has the right value but it is a '),
        (lambda z, y, m: float(jnp.sum((jnp.argmax(z, -1) == y) * m)), 'not an integer'),
        (lambda z, y, m: int(jnp.sum((jnp.argmax(z, 0) == y) * m)), 'the argmax over the classes, the last axis'),
        (lambda z, y, m: int(jnp.sum((jnp.argmax(z, -1) != y) * m)), 'that is the number of WRONG real examples'),
    ],
}


def test_every_exercise_has_at_least_three_typical_mistakes_tested():
  assert set(WRONG) | {'02.2'} == set(IDS)
  assert all(len(WRONG[key]) >= 3 for key in WRONG), {key: len(v) for key, v in WRONG.items() if len(v) < 3}


@pytest.mark.parametrize('exercise_id', sorted(WRONG))
def test_typical_mistakes_get_their_hint(exercise_id):
  for answer, hint in WRONG[exercise_id]:
    result = outcome(exercise_id, answer)
    assert not result.passed and result.attempted, result.message
    assert hint in result.message, result.message


def test_train_step_mistakes():
  def without_aux(model, optimizer, batch):
    (loss, aux), grads = nnx.value_and_grad(S.loss_with_metrics)(model, batch)
    optimizer.update(model, grads)
    return {'loss': loss, **aux}

  def no_update(model, optimizer, batch):
    (loss, aux), grads = nnx.value_and_grad(S.loss_with_metrics, has_aux=True)(model, batch)
    return {'loss': loss, **aux}

  def old_update(model, optimizer, batch):
    (loss, aux), grads = nnx.value_and_grad(S.loss_with_metrics, has_aux=True)(model, batch)
    optimizer.update(grads)
    return {'loss': loss, **aux}

  fixed = {'image': np.zeros((16, 8, 8, 1), np.float32), 'label': np.zeros(16, np.int32)}

  def global_batch(model, optimizer, batch):
    return S.train_step(model, optimizer, fixed)

  def not_jitted(model, optimizer, batch):   # right results, but traced at every call
    (loss, aux), grads = nnx.value_and_grad(S.loss_with_metrics, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return {'loss': loss, **aux}

  message = outcome('02.2', not_jitted).message
  assert 'the results are right, but the step is not compiled' in message and '@nnx.jit' in message, message
  assert outcome('02.2', nnx.jit(not_jitted)).passed
  message = outcome('02.2', jax.jit(not_jitted)).message   # jax.jit updates copies of the model
  assert 'the weights did not change' in message or 'not compiled' in message, message
  assert 'closure bug' in outcome('02.2', global_batch).message
  message = outcome('02.2', without_aux).message
  assert 'your code raised TypeError' in message and 'pass has_aux=True to nnx.value_and_grad' in message
  assert 'the weights did not change' in outcome('02.2', no_update).message
  assert 'optimizer.update(model, grads)' in outcome('02.2', old_update).message
  assert "the returned 'loss' at step 0 is" in outcome('02.2', global_batch).message


@pytest.mark.parametrize('path', [p for p in NOTEBOOKS if p.name[:2] != '00'], ids=lambda p: p.name)
def test_stored_notebook_ends_with_checked_exercises(path):
  nb = nbformat.read(path, as_version=4)
  number = path.name[:2]
  checked, heading = [], None
  for index, cell in enumerate(nb.cells):
    if cell.cell_type == 'markdown' and cell.source.startswith('## Exercises'):
      heading = index
    if cell.cell_type == 'code' and 'ft.exercises.check(' in cell.source:
      exercise_id = cell.source.split('ft.exercises.check(')[1].split(',')[0].strip('\'" ')
      checked.append(exercise_id)
      outputs = ''.join(o.get('text', '') for o in cell.outputs if o.get('output_type') == 'stream')
      assert not any(o.get('output_type') == 'error' for o in cell.outputs), (path.name, exercise_id)
      assert outputs.startswith(f'{exercise_id} not attempted yet'), (path.name, exercise_id, outputs)
  expected = [key for key in IDS if key.startswith(number + '.')]
  if number == '10' and not checked:
    pytest.skip('notebook 10 has no exercise cells yet')
  assert heading is not None, f'{path.name} has no "## Exercises" section'
  assert checked == expected, (path.name, checked)
  assert any("ft.exercises.solution('" in c.source for c in nb.cells[heading:]), path.name


def test_device_slice_error_names_both_numbers_as_whole_numbers():
  def raising(message):
    def device_slice(global_batch, num_devices, device_index):
      if global_batch % num_devices:
        raise ValueError(message.format(n=global_batch, d=num_devices))
      return S.device_slice(global_batch, num_devices, device_index)
    return device_slice

  assert outcome('10.1', raising('cannot split {n} rows over {d}.')).passed         # a full stop after a number
  assert outcome('10.1', raising('{n} % {d} != 0')).passed
  message = outcome('10.1', raising('batch {n}0 over {d}.5 devices')).message       # 100 and 4.5 name neither
  assert 'which does not name 10 and 4' in message, message


def test_quantize_int8_model_answer_is_the_librarys():
  for kernel in (np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32), np.zeros((4, 2), np.float32)):
    for mine, library in zip(S.quantize_int8(kernel), ft.export.quantize_int8(kernel)):
      np.testing.assert_array_equal(np.asarray(mine), np.asarray(library).reshape(np.shape(mine)))
      assert np.asarray(mine).dtype == np.asarray(library).dtype
  assert outcome('13.1', ft.export.quantize_int8).passed      # its scale keeps the kernel's axes (keepdims)
