"""flaxtrain.text: the Python-docs corpus, windows, baselines, the loss and the sampler."""

import math
import platform
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxtrain as ft


@pytest.fixture(scope='module')
def splits():
  return ft.load_python_docs(20_000, val_fraction=0.25)


# Corpus and vocabulary ---------------------------------------------------------


def test_load_python_docs_is_reproducible_and_splits_in_order(splits):
  again = ft.load_python_docs(20_000, val_fraction=0.25)
  assert again.sha256 == splits.sha256 and again.text == splits.text
  assert (len(splits.train), len(splits.val)) == (15_000, 5_000)
  assert splits.train.dtype == np.int32
  # validation is the end of the slice, training the part before it
  assert splits.vocab.decode(splits.train) + splits.vocab.decode(splits.val) == splits.text
  assert splits.python_version == platform.python_version()
  assert set(splits.vocab.chars) == set(splits.text)
  other = ft.load_python_docs(20_000, val_fraction=0.25, start=1000)
  assert other.text[:-1000] == splits.text[1000:] and other.sha256 != splits.sha256


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_chars=0), 'num_chars: expected a positive int, got 0'),
    (dict(num_chars=10**9), r'num_chars: expected at most \d+ \(the text of this Python has \d+ characters'),
    (dict(num_chars=1000, val_fraction=1.0), r'val_fraction: expected a fraction in \(0, 1\), got 1.0'),
    (dict(num_chars=10, val_fraction=0.01), 'val_fraction: expected a fraction that leaves at least 2'),
    (dict(num_chars=1000, start=-1), 'start: expected an int >= 0, got -1'),
])
def test_load_python_docs_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ft.load_python_docs(**kwargs)


def test_char_vocab_round_trip_and_errors():
  vocab = ft.CharVocab.from_text('hello world')
  assert vocab.chars == ' dehlorw' and vocab.size == 8
  ids = vocab.encode('low')
  assert ids.tolist() == [4, 5, 7] and vocab.decode(ids) == 'low'
  with pytest.raises(ValueError, match=r"text: expected only characters of the vocabulary, got unknown \['!', 'x'\]"):
    vocab.encode('x!')
  with pytest.raises(ValueError, match=r'tokens: expected ids in \[0, 8\), got values in \[0, 8\]'):
    vocab.decode([0, 8])
  with pytest.raises(ValueError, match='chars: expected distinct characters'):
    ft.CharVocab('aab')


# Windows -------------------------------------------------------------------------


def test_training_windows_are_shifted_slices_with_a_seeded_offset_and_order():
  tokens = np.arange(1000, dtype=np.int32)  # each token is its own position
  loader = ft.TextLoader(tokens, context=16, batch_size=8, seed=3)
  assert len(loader) == ((1000 - 16) // 16) // 8
  offsets = set()
  for epoch in range(4):
    batches = list(loader.epoch(epoch))
    assert len(batches) == len(loader)
    for batch in batches:
      assert batch['input'].shape == batch['target'].shape == (8, 16) and 'mask' not in batch
      np.testing.assert_array_equal(batch['target'], batch['input'] + 1)  # the next character
      np.testing.assert_array_equal(np.diff(batch['input'], axis=1), 1)  # contiguous
    starts = np.concatenate([b['input'][:, 0] for b in batches])
    assert len(set(starts % 16)) == 1  # one offset per epoch, windows do not overlap
    offsets.add(int(starts[0] % 16))
    assert len(set(starts)) == len(starts)
  assert len(offsets) > 1  # different epochs, different window boundaries
  same = [b['input'] for b in ft.TextLoader(tokens, 16, 8, seed=3).epoch(2)]
  np.testing.assert_array_equal(np.stack(same), np.stack([b['input'] for b in loader.epoch(2)]))
  resumed = list(loader.epoch(2, start=3))
  np.testing.assert_array_equal(resumed[0]['input'], list(loader.epoch(2))[3]['input'])


def test_evaluation_windows_cover_the_tokens_in_order_and_pad_with_a_mask():
  tokens = np.arange(100, dtype=np.int32)
  loader = ft.TextLoader(tokens, context=10, batch_size=4, shuffle=False)
  batches = list(loader.epoch(0))
  assert loader.num_examples == 9 and len(batches) == len(loader) == 3
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.tolist() == [1] * 9 + [0] * 3
  inputs = np.concatenate([b['input'] for b in batches])[masks == 1]
  np.testing.assert_array_equal(inputs.ravel(), np.arange(90))
  np.testing.assert_array_equal(loader.scored_tokens, np.arange(91))


@pytest.mark.parametrize('make, match', [
    (lambda: ft.TextLoader(np.arange(10), context=16, batch_size=1), 'tokens: expected at least 32 tokens for context=16, got 10'),
    (lambda: ft.TextLoader(np.arange(100), context=10, batch_size=20), r'batch_size: expected at most the number of windows \(9\)'),
    (lambda: ft.TextLoader(np.ones((4, 4), np.int32), 2, 1), 'tokens: expected a 1-D integer array'),
    (lambda: ft.TextLoader(np.arange(100.0), 2, 1), 'tokens: expected a 1-D integer array'),
    (lambda: ft.TextLoader(np.arange(100), 0, 1), 'context: expected a positive int, got 0'),
    (lambda: ft.TextLoader(np.arange(100), 4, 2, vocab_size=65),
     r"tokens: expected token ids below the model's vocab_size \(65\), got ids up to 99"),
    (lambda: ft.TextLoader(np.arange(100), 4, 2, vocab_size=0), 'vocab_size: expected a positive int, got 0'),
])
def test_text_loader_rejects_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_a_loader_tells_whether_its_token_ids_fit_a_model():
  loader = ft.TextLoader(np.arange(100) % 70, 4, 2)
  assert loader.max_token_id == 69
  loader.check_vocab_size(70)  # ids 0..69 fit
  model = ft.TransformerLM(65, context=4, d_model=8, num_heads=2, num_layers=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"val_loader: expected token ids below the model's vocab_size \(65\), "
                                       r'got ids up to 69; build the model with vocab_size=vocab.size'):
    loader.check_vocab_size(model.vocab_size, name='val_loader')


# Baselines -------------------------------------------------------------------------


def _bits_by_counting(train, tokens, vocab_size, smoothing, order):
  """The baselines written out with Counters and loops, to check the vectorised ones."""
  unigram = Counter(train.tolist())
  total = len(train)

  def p_uni(c, k):
    return (unigram[c] + k) / (total + k * vocab_size)

  pairs = Counter(zip(train[:-1].tolist(), train[1:].tolist()))
  starts = Counter(train[:-1].tolist())
  bits = []
  for a, b in zip(tokens[:-1].tolist(), tokens[1:].tolist()):
    if order == 1:
      p = p_uni(b, smoothing)
    else:
      p = (pairs[(a, b)] + smoothing * p_uni(b, 1.0)) / (starts[a] + smoothing)
    bits.append(-math.log2(p))
  return sum(bits) / len(bits)


@pytest.mark.parametrize('smoothing', [0.5, 1.0, 20.0])
def test_baselines_match_counting_by_hand(smoothing):
  rng = np.random.default_rng(0)
  train, tokens = rng.integers(0, 6, 500), rng.integers(0, 7, 200)  # token 6 never seen in training
  assert ft.unigram_bits_per_char(train, tokens, 7, smoothing=smoothing) == pytest.approx(
      _bits_by_counting(train, tokens, 7, smoothing, order=1), rel=1e-9)
  assert ft.bigram_bits_per_char(train, tokens, 7, smoothing=smoothing) == pytest.approx(
      _bits_by_counting(train, tokens, 7, smoothing, order=2), rel=1e-9)


def test_bigram_beats_unigram_where_the_previous_character_tells():
  cycle = np.tile(np.arange(5), 200)  # each character fixes the next one
  assert ft.unigram_bits_per_char(cycle, cycle, 5) == pytest.approx(math.log2(5), rel=1e-3)
  assert ft.bigram_bits_per_char(cycle, cycle, 5) < 0.01


def test_baselines_on_python_docs_order_as_expected(splits):
  unigram = ft.unigram_bits_per_char(splits.train, splits.val, splits.vocab.size)
  bigram = ft.bigram_bits_per_char(splits.train, splits.val, splits.vocab.size)
  assert bigram < unigram - 0.3 and unigram < math.log2(splits.vocab.size)


def test_baselines_reject_bad_arguments():
  with pytest.raises(ValueError, match=r'tokens: expected token ids < vocab_size \(3\), got 5'):
    ft.bigram_bits_per_char([0, 1, 2], [0, 5], 3)
  with pytest.raises(ValueError, match='smoothing: expected a finite number > 0, got 0'):
    ft.unigram_bits_per_char([0, 1], [0, 1], 2, smoothing=0)


# Loss ------------------------------------------------------------------------------


class _Table(nnx.Module):
  """Logits from a lookup table of the input token: a bigram model with parameters."""

  def __init__(self, vocab_size, context=8, seed=0):
    self.table = nnx.Param(jax.random.normal(jax.random.key(seed), (vocab_size, vocab_size)))
    self.vocab_size, self.context = vocab_size, context

  def __call__(self, tokens):
    return self.table[...][tokens]


def test_next_token_loss_is_the_mean_cross_entropy_and_ignores_padding():
  model = _Table(5)
  rng = np.random.default_rng(1)
  batch = {'input': rng.integers(0, 5, (3, 4)).astype(np.int32), 'target': rng.integers(0, 5, (3, 4)).astype(np.int32)}
  logits = np.asarray(model.table[...])[batch['input']]
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.mean(np.take_along_axis(log_probs, batch['target'][..., None], -1))
  loss, aux = jax.jit(ft.next_token_loss)(model, batch)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(aux['bits_per_char']) == pytest.approx(want / math.log(2), rel=1e-5)
  padded = {k: np.concatenate([v, rng.integers(0, 5, (2, 4)).astype(np.int32)]) for k, v in batch.items()}
  padded['mask'] = np.array([1, 1, 1, 0, 0], np.float32)
  assert float(ft.next_token_loss(model, padded)[0]) == pytest.approx(want, rel=1e-5)


def test_next_token_loss_names_a_shape_mismatch():
  batch = {'input': np.zeros((2, 4), np.int32), 'target': np.zeros((2, 3), np.int32)}
  with pytest.raises(ValueError, match=r'target: expected shape \(2, 4\) \(same as input\), got \(2, 3\)'):
    ft.next_token_loss(_Table(3), batch)


# Sampler ---------------------------------------------------------------------------


class _Counter(nnx.Module):
  """Predicts, with certainty, the token after the one at each position, plus one (mod vocab)."""

  def __init__(self, vocab_size, context):
    self.vocab_size, self.context = vocab_size, context
    self.scale = nnx.Param(jnp.float32(100.0))

  def __call__(self, tokens):
    return self.scale[...] * jax.nn.one_hot((tokens + 1) % self.vocab_size, self.vocab_size)


@pytest.mark.parametrize('prompt', ['a', 'abcd', 'defabcdefabc'])  # shorter and longer than the context
def test_sample_text_continues_from_the_last_character(prompt):
  vocab = ft.CharVocab('abcdef')
  text = ft.sample_text(_Counter(6, context=5), vocab, prompt, 9, seed=0)
  start = vocab.chars.index(prompt[-1])
  assert text == prompt + ''.join(vocab.chars[(start + i) % 6] for i in range(1, 10))


def test_sample_text_is_seeded():
  vocab = ft.CharVocab('abcdefgh')
  model = _Table(8, context=4)
  a = ft.sample_text(model, vocab, 'ab', 40, seed=1)
  assert a == ft.sample_text(model, vocab, 'ab', 40, seed=1)
  assert a != ft.sample_text(model, vocab, 'ab', 40, seed=2)
  assert len(a) == 42 and a.startswith('ab') and set(a) <= set(vocab.chars)


def test_sample_text_follows_the_model_distribution():
  vocab = ft.CharVocab('ab')
  model = _Table(2, context=4)
  model.table[...] = jnp.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])  # p(b) = 0.75 after anything
  text = ft.sample_text(model, vocab, 'a', 4000, seed=0)
  assert text[1:].count('b') / 4000 == pytest.approx(0.75, abs=0.03)
  cold = ft.sample_text(model, vocab, 'a', 4000, seed=0, temperature=0.25)  # p(b) = 3**4 / (1 + 3**4)
  assert cold[1:].count('b') / 4000 == pytest.approx(81 / 82, abs=0.01)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(prompt=''), ValueError, 'prompt: expected a non-empty string'),
    (dict(prompt='az'), ValueError, r"text: expected only characters of the vocabulary, got unknown \['z'\]"),
    (dict(temperature=0.0), ValueError, 'temperature: expected a finite number > 0, got 0.0'),
    (dict(num_chars=0), ValueError, 'num_chars: expected a positive int, got 0'),
    (dict(vocab=ft.CharVocab('abc')), ValueError, r"vocab: expected 2 characters, the model's vocab_size, got 3"),
    (dict(model=nnx.Linear(2, 2, rngs=nnx.Rngs(0))), TypeError, 'model: expected a language model with an int `context`'),
])
def test_sample_text_rejects_bad_arguments(kwargs, error, match):
  arguments = dict(model=_Table(2), vocab=ft.CharVocab('ab'), prompt='a', num_chars=3, seed=0) | kwargs
  with pytest.raises(error, match=match):
    ft.sample_text(arguments.pop('model'), arguments.pop('vocab'), arguments.pop('prompt'),
                   arguments.pop('num_chars'), **arguments)
