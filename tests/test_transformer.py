"""flaxtrain.TransformerLM: shapes, causal masking, input checks, and that it learns context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxtrain as ft


def small(**kwargs):
  config = dict(context=12, d_model=16, num_heads=2, num_layers=2, rngs=nnx.Rngs(0)) | kwargs
  return ft.TransformerLM(11, **config)


def test_shapes_and_parameter_count():
  model = small()
  assert model(jnp.zeros((3, 12), jnp.int32)).shape == (3, 12, 11)
  assert model(jnp.zeros((1, 5), jnp.int32)).shape == (1, 5, 11)  # shorter than the context is fine
  d, v, c, layers = 16, 11, 12, 2
  per_block = 2 * (2 * d) + 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
  want = v * d + c * d + layers * per_block + 2 * d + (d * v + v)
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == want


@pytest.mark.parametrize('changed', [0, 5, 11])
def test_a_later_token_does_not_change_earlier_logits(changed):
  model = small()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 11)
  other = tokens.at[:, changed].set((tokens[:, changed] + 1) % 11)
  a, b = model(tokens), model(other)
  np.testing.assert_array_equal(a[:, :changed], b[:, :changed])  # bit for bit: masked, not just small
  # the changed position and every later one do see the change
  assert np.all(np.abs(np.asarray(a - b)[:, changed:]).max(axis=-1) > 1e-4)


def test_without_the_mask_earlier_logits_would_change():
  """The test above can fail: the same check on attention with the mask removed does fail."""
  model = small()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 11)
  other = tokens.at[:, 11].set((tokens[:, 11] + 1) % 11)

  def unmasked(tokens):
    x = model.token_embed(tokens) + model.position_embed(jnp.arange(12))[None]
    everything = jnp.ones((1, 1, 12, 12), bool)
    for block in model.blocks:
      x = block(x, everything)
    return model.head(model.norm(x))

  assert np.abs(np.asarray(unmasked(tokens) - unmasked(other))[:, 0]).max() > 1e-4


def test_jit_gives_the_same_logits():
  model = small()
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 11)
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(model, tokens), model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tokens, match', [
    (jnp.zeros((2, 13), jnp.int32), r"tokens: expected a length in \[1, 12\] \(the model's context\), got 13"),
    (jnp.zeros((12,), jnp.int32), r'tokens: expected integer token ids of shape \(batch, length\), got int32 shape \(12,\)'),
    (jnp.zeros((2, 12)), 'tokens: expected integer token ids of shape .batch, length., got float32'),
    (jnp.full((1, 4), 11), r'tokens: expected ids in \[0, 11\) \(vocab_size\), got values in \[11, 11\]'),
    (jnp.full((1, 4), -1), r'tokens: expected ids in \[0, 11\) \(vocab_size\), got values in \[-1, -1\]'),
])
def test_bad_inputs_are_named(tokens, match):
  with pytest.raises(ValueError, match=match):
    small()(tokens)


@pytest.mark.parametrize('kwargs, match', [
    (dict(d_model=15, num_heads=2), 'd_model: expected a multiple of num_heads .2., got 15'),
    (dict(context=0), 'context: expected a positive int, got 0'),
    (dict(num_layers=1.5), 'num_layers: expected a positive int, got 1.5'),
    (dict(dtype='bf16'), r"dtype: expected None or a floating-point dtype such as jnp.float32, jnp.bfloat16 or "
                         r"jnp.float16 \(or 'float32', 'bfloat16', 'float16'\), got 'bf16' \(did you mean 'bfloat16', "
                         r"i.e. jnp.bfloat16\?\)"),
    (dict(param_dtype='int32'), "param_dtype: expected a floating-point dtype .*got 'int32'"),
])
def test_bad_constructor_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    small(**kwargs)


def test_it_learns_what_a_bigram_cannot():
  """In 'aab' repeated, the character after 'a' depends on the one before it: a bigram
  model is unsure there (2/3 bits per character on average), a transformer need not be."""
  vocab = ft.CharVocab('ab')
  tokens = vocab.encode('aab' * 2000)
  bigram = ft.bigram_bits_per_char(tokens, tokens, vocab.size, smoothing=0.01)
  assert bigram > 0.6
  model = ft.TransformerLM(vocab.size, context=16, d_model=16, num_heads=2, num_layers=1, rngs=nnx.Rngs(0))
  loader = ft.TextLoader(tokens, 16, 16, seed=0)
  schedule = ft.warmup_cosine(1e-2, 5 * len(loader), 20)
  optimizer = nnx.Optimizer(model, ft.make_optimizer('adamw', schedule, clip_norm=1.0), wrt=nnx.Param)
  history = ft.fit(model, optimizer, loader, epochs=5, steps_per_dispatch=23,
                   val_loader=ft.TextLoader(tokens, 16, 16, shuffle=False), loss_fn=ft.next_token_loss,
                   progress=False)
  assert history.epochs()['val_bits_per_char'][-1] < bigram / 4
