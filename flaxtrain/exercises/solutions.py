"""Model answers to the exercises at the end of notebooks 01 to 12.

``ft.exercises.solution('04.1')`` prints one of them. Each is short on
purpose: the few lines the exercise asks for, written the way the notebook
taught. ``ft.exercises.check`` compares the learner's answer with these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxtrain as ft

__all__ = [
    'masked_mean', 'cross_entropy',                            # 01
    'mse_grads', 'loss_with_metrics', 'train_step',           # 02
    'momentum_step', 'adamw_step',                             # 03
    'warmup_stable_decay', 'inverse_sqrt',                     # 04
    'global_norm', 'clip_by_global_norm',                      # 05
    'unscale_and_check', 'next_loss_scale',                    # 06
    'nonfinite_paths', 'dead_fraction',                        # 07
    'epoch_mean', 'should_stop',                               # 08
    'stack', 'run_steps',                                      # 09
    'device_slice', 'data_parallel_sharding',                  # 10
    'causal_mask', 'inputs_and_targets',                       # 11
    'split_indices', 'count_correct',                          # 12
    'quantize_int8', 'predict_in_batches',                     # 13
]


# 01 · Loss functions ------------------------------------------------------------

def masked_mean(values, mask):
  """01.1: the mean of ``values`` over the entries where ``mask`` is 1."""
  return jnp.sum(values * mask) / jnp.sum(mask)


def cross_entropy(logits, labels):
  """01.2: mean cross-entropy of ``logits`` (batch, classes) and integer ``labels`` (batch,)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  return -jnp.mean(picked)


# 02 · Gradients and the train step -----------------------------------------------

def mse_grads(params, x, y):
  """02.1: the gradients of mean((x @ w + b - y) ** 2) with respect to params {'w': (features,), 'b': ()}."""
  residuals = x @ params['w'] + params['b'] - y
  return {'w': 2 * x.T @ residuals / len(y), 'b': 2 * jnp.mean(residuals)}


def loss_with_metrics(model, batch):
  """The loss function of notebook 02, section 3: (cross-entropy, {'accuracy': ...}) from one forward pass."""
  logits = model(batch['image'])
  loss = ft.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return loss, {'accuracy': ft.accuracy(logits, batch['label'])}


@nnx.jit
def train_step(model, optimizer, batch):
  """02.2: one update of ``model`` on ``batch``; returns {'loss': ..., 'accuracy': ...}."""
  (loss, aux), grads = nnx.value_and_grad(loss_with_metrics, has_aux=True)(model, batch)
  optimizer.update(model, grads)
  return {'loss': loss, **aux}


# 03 · Optimizers ----------------------------------------------------------------

def momentum_step(grads, velocity, learning_rate, momentum):
  """03.1: SGD with momentum, as optax computes it; returns (updates, new velocity)."""
  velocity = jax.tree.map(lambda m, g: g + momentum * m, velocity, grads)
  updates = jax.tree.map(lambda m: -learning_rate * m, velocity)
  return updates, velocity


def adamw_step(g, m, v, t, params, learning_rate=1e-3, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8):
  """03.2: one AdamW update of one array at update number ``t`` (1 for the first); returns (update, m, v)."""
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g ** 2
  m_hat = m / (1 - b1 ** t)
  v_hat = v / (1 - b2 ** t)
  adam_direction = m_hat / (jnp.sqrt(v_hat) + eps)
  return -learning_rate * (adam_direction + weight_decay * params), m, v


# 04 · Learning-rate schedules ---------------------------------------------------

def warmup_stable_decay(peak, warmup_steps, stable_steps, decay_steps):
  """04.1: linear warmup 0 -> peak, hold the peak, linear decay peak -> 0; joined with join_schedules."""
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  stable = optax.constant_schedule(peak)
  decay = optax.linear_schedule(peak, 0.0, decay_steps)
  return optax.join_schedules([warmup, stable, decay], boundaries=[warmup_steps, warmup_steps + stable_steps])


def inverse_sqrt(peak, warmup_steps):
  """04.2: linear warmup to ``peak`` at ``warmup_steps``, then ``peak * sqrt(warmup_steps / step)``."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = peak * step / warmup_steps
    decay = peak * jnp.sqrt(warmup_steps / jnp.maximum(step, 1.0))
    return jnp.where(step < warmup_steps, warmup, decay)
  return schedule


# 05 · Gradient clipping ---------------------------------------------------------

def global_norm(grads):
  """05.1: the norm of all the arrays of ``grads`` seen as one long vector."""
  return jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))


def clip_by_global_norm(grads, max_norm):
  """05.2: ``grads`` scaled by one factor so that its global norm is at most ``max_norm``."""
  norm = global_norm(grads)
  factor = jnp.minimum(1.0, max_norm / norm)
  return jax.tree.map(lambda g: g * factor, grads)


# 06 · Mixed precision -----------------------------------------------------------

def unscale_and_check(scaled_grads, loss_scale):
  """06.1: (gradients divided by ``loss_scale``, whether every entry is finite)."""
  grads = jax.tree.map(lambda g: g / loss_scale, scaled_grads)
  finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  return grads, finite


def next_loss_scale(scale, good_steps, finite, growth_interval):
  """06.2: the dynamic loss scale and its count of finite steps, after one step."""
  if not finite:
    return scale / 2, 0
  good_steps += 1
  if good_steps == growth_interval:
    return scale * 2, 0
  return scale, good_steps


# 07 · Debugging training --------------------------------------------------------

def nonfinite_paths(tree):
  """07.1: ``jax.tree_util.keystr`` paths of the leaves of ``tree`` holding a NaN or an inf, in tree order."""
  return [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if not jnp.all(jnp.isfinite(leaf))]


def dead_fraction(pre_activations):
  """07.2: the fraction of units (columns) whose ReLU input is <= 0 for every example (row)."""
  dead = jnp.all(pre_activations <= 0, axis=0)
  return float(jnp.mean(dead))


# 08 · The complete training loop ------------------------------------------------

def epoch_mean(batch_means, batch_sizes):
  """08.1: the mean over all examples, from each batch's mean and its number of examples."""
  batch_means, batch_sizes = np.asarray(batch_means), np.asarray(batch_sizes)
  return float(np.sum(batch_means * batch_sizes) / np.sum(batch_sizes))


def should_stop(val_losses, patience):
  """08.2: True when the lowest validation loss is ``patience`` or more epochs old."""
  best_epoch = int(np.argmin(val_losses))
  return len(val_losses) - 1 - best_epoch >= patience


# 09 · Fast training loops -------------------------------------------------------

def stack(batches):
  """09.1: a list of K batches (dicts of arrays) as one dict of arrays with a leading axis of K."""
  return jax.tree.map(lambda *arrays: np.stack(arrays), *batches)


def run_steps(step, params, stacked):
  """09.2: ``step`` applied to each batch of ``stacked`` in turn with jax.lax.scan; returns (params, losses)."""
  return jax.lax.scan(step, params, stacked)


# 10 · Scaling to many devices ---------------------------------------------------

def device_slice(global_batch, num_devices, device_index):
  """10.1: the ``slice`` of a global batch that device ``device_index`` holds under data parallelism."""
  if global_batch % num_devices:
    raise ValueError(f'global_batch {global_batch} is not divisible by num_devices {num_devices}')
  per_device = global_batch // num_devices
  return slice(device_index * per_device, (device_index + 1) * per_device)


def data_parallel_sharding(mesh):
  """10.2: a sharding that splits a batch's first axis over the mesh axis 'data'."""
  return NamedSharding(mesh, P('data'))


# 11 · A small transformer -------------------------------------------------------

def causal_mask(length):
  """11.1: boolean (length, length) mask, True where query position q may attend to key position k <= q."""
  positions = jnp.arange(length)
  return positions[None, :] <= positions[:, None]


def inputs_and_targets(tokens):
  """11.2: (inputs, targets) for next-token prediction from ``tokens`` (batch, length + 1)."""
  return tokens[:, :-1], tokens[:, 1:]


# 12 · Best practices ------------------------------------------------------------

def split_indices(n, val_fraction, seed):
  """12.1: (train indices, validation indices): a seeded shuffle of range(n), the last part for validation."""
  order = np.random.default_rng(seed).permutation(n)
  num_val = round(n * val_fraction)
  return order[:n - num_val], order[n - num_val:]


def count_correct(logits, labels, mask):
  """12.2: how many real examples (mask 1) ``logits`` classify correctly, as an int."""
  correct = (jnp.argmax(logits, axis=-1) == labels) & (mask > 0)
  return int(jnp.sum(correct))


# 13 · From a trained model to predictions -----------------------------------------

def quantize_int8(kernel):
  """13.1: symmetric int8 per output channel (the last axis); returns (q int8, scale float32 per channel)."""
  amax = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)   # an all-zero channel: any scale, q is 0
  q = jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8)
  return q, scale.astype(jnp.float32)


def predict_in_batches(predict, images, batch_size):
  """13.2: ``predict`` on chunks of exactly ``batch_size`` rows (the last one padded); one output per image."""
  outputs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    real = len(chunk)
    padding = np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)
    outputs.append(np.asarray(predict(np.concatenate([chunk, padding])))[:real])
  return np.concatenate(outputs)
