"""Text for a character-level language model, from Python's own documentation.

Python ships the text of its help pages (``help('assert')``, ``help('for')``,
...) in the standard-library module ``pydoc_data.topics``: about 465,000
characters of English prose and code examples, so nothing is downloaded. The
text changes a little between Python versions; :func:`load_python_docs`
records the version and a SHA-256 of the slice it took.

The pieces here, in the order a notebook uses them:

* :func:`load_python_docs` slices the text reproducibly, builds a
  :class:`CharVocab` and splits the tokens into a training and a validation
  part (contiguous, training first);
* :class:`TextLoader` cuts a token array into ``(input, target)`` windows,
  ``target`` being ``input`` shifted by one character, and batches them in the
  protocol ``flaxtrain.fit`` expects (``len()`` and ``.epoch(epoch, start)``);
* :func:`unigram_bits_per_char` and :func:`bigram_bits_per_char`: the
  baselines a model has to beat, in bits per character;
* :func:`next_token_loss`, a ``loss_fn(model, batch) -> (loss, aux)`` for
  :func:`flaxtrain.fit`, and :func:`sample_text`, seeded generation.

Introduced in notebook 11 (a small transformer).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import platform
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxtrain import checks
from flaxtrain.losses import softmax_cross_entropy_with_integer_labels

__all__ = [
    'CharVocab',
    'TextSplits',
    'load_python_docs',
    'TextLoader',
    'unigram_bits_per_char',
    'bigram_bits_per_char',
    'next_token_loss',
    'sample_text',
]

_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class CharVocab:
  """A character vocabulary: token ``i`` is the character ``chars[i]``.

  Attributes:
    chars: the distinct characters, sorted by code point.

  Example:
    >>> vocab = CharVocab.from_text('hello')
    >>> vocab.chars, vocab.encode('hole').tolist(), vocab.decode([3, 1])
    ('ehlo', [1, 3, 2, 0], 'oe')
  """

  chars: str

  def __post_init__(self):
    if not isinstance(self.chars, str) or not self.chars:
      raise ValueError(f'chars: expected a non-empty string, got {self.chars!r:.60}')
    if len(set(self.chars)) != len(self.chars):
      raise ValueError(f'chars: expected distinct characters, got duplicates in {self.chars!r:.60}')
    object.__setattr__(self, '_index', {c: i for i, c in enumerate(self.chars)})

  @classmethod
  def from_text(cls, text: str) -> 'CharVocab':
    """The vocabulary of every character that occurs in ``text``."""
    if not isinstance(text, str) or not text:
      raise ValueError(f'text: expected a non-empty string, got {text!r:.60}')
    return cls(''.join(sorted(set(text))))

  @property
  def size(self) -> int:
    """Number of characters (tokens)."""
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """``text`` as an int32 array of token ids.

    Raises:
      ValueError: naming the characters that are not in the vocabulary.
    """
    if not isinstance(text, str):
      raise TypeError(f'text: expected a str, got {type(text).__name__}')
    unknown = sorted(set(text) - set(self._index))
    if unknown:
      raise ValueError(f'text: expected only characters of the vocabulary, got unknown {unknown[:10]!r}')
    return np.fromiter((self._index[c] for c in text), dtype=np.int32, count=len(text))

  def decode(self, tokens: Any) -> str:
    """Token ids (any integer array or sequence) back to a string."""
    tokens = np.asarray(tokens)
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f'tokens: expected integer token ids, got dtype {tokens.dtype}')
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.size):
      raise ValueError(
          f'tokens: expected ids in [0, {self.size}), got values in [{tokens.min()}, {tokens.max()}]'
      )
    return ''.join(self.chars[i] for i in tokens.ravel().tolist())


@dataclasses.dataclass(frozen=True)
class TextSplits:
  """A reproducible slice of text, as tokens, split into training and validation.

  Attributes:
    train, val: int32 token arrays; ``val`` follows ``train`` in the text.
    vocab: the :class:`CharVocab` of the whole slice.
    text: the slice itself.
    python_version: the Python whose ``pydoc_data.topics`` the text came from.
    sha256: hex digest of the slice (UTF-8), to tell whether two runs used the
      same text.
  """

  train: np.ndarray
  val: np.ndarray
  vocab: CharVocab
  text: str
  python_version: str
  sha256: str


def load_python_docs(num_chars: int = 150_000, *, val_fraction: float = 0.1, start: int = 0) -> TextSplits:
  """A slice of the help pages that ship with Python, split for language modelling.

  The topics of ``pydoc_data.topics`` are joined in sorted order of their
  names, separated by a blank line, and ``num_chars`` characters from
  ``start`` are kept. The last ``val_fraction`` of the slice is validation;
  the rest, before it, is training. The vocabulary holds every character of
  the slice, so validation text can always be encoded.

  Args:
    num_chars: length of the slice, a positive int at most the length of the
      whole text (about 465,000 characters; it depends on the Python version).
    val_fraction: fraction of the slice kept for validation, in (0, 1).
    start: index of the first character of the slice, an int >= 0.

  Returns:
    A :class:`TextSplits`.

  Example:
    >>> splits = load_python_docs(100_000)
    >>> len(splits.train), len(splits.val)
    (90000, 10000)
  """
  from pydoc_data import topics  # standard library

  checks.check_int('num_chars', num_chars)
  checks.check_int('start', start, minimum=0)
  checks.check_real('val_fraction', val_fraction, expected='a fraction in (0, 1)', valid=lambda v: 0.0 < v < 1.0)
  text = '\n\n'.join(topics.topics[name] for name in sorted(topics.topics))
  if start + num_chars > len(text):
    raise ValueError(
        f'num_chars: expected at most {len(text) - start} (the text of this Python has {len(text)} '
        f'characters, and start={start}), got {num_chars}'
    )
  piece = text[start:start + num_chars]
  num_val = int(round(num_chars * val_fraction))
  if not 2 <= num_val <= num_chars - 2:
    raise ValueError(
        f'val_fraction: expected a fraction that leaves at least 2 characters on each side, got '
        f'{val_fraction} of {num_chars} characters'
    )
  vocab = CharVocab.from_text(piece)
  tokens = vocab.encode(piece)
  return TextSplits(
      train=tokens[:-num_val], val=tokens[-num_val:], vocab=vocab, text=piece,
      python_version=platform.python_version(), sha256=hashlib.sha256(piece.encode('utf-8')).hexdigest(),
  )


def _check_tokens(name: str, tokens: Any, minimum_length: int = 2) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'{name}: expected a 1-D integer array of token ids, got {tokens.dtype} shape {tokens.shape}')
  if len(tokens) < minimum_length:
    raise ValueError(f'{name}: expected at least {minimum_length} tokens, got {len(tokens)}')
  if tokens.min() < 0:
    raise ValueError(f'{name}: expected token ids >= 0, got {tokens.min()}')
  return tokens


class TextLoader:
  """Batches of ``(input, target)`` windows cut from one token array.

  A window is ``context + 1`` consecutive tokens: ``input`` is the first
  ``context`` of them and ``target`` the last ``context``, so position ``t``
  of ``target`` is the character that follows position ``t`` of ``input``.
  Windows do not overlap, so an epoch sees every character (about) once.

  * ``shuffle=True`` (training): epoch ``e`` cuts the windows from a random
    offset in ``[0, context)`` and visits them in a random order, both fixed by
    ``(seed, e)``, so different epochs see different window boundaries. Every
    epoch has the same number of windows; the last incomplete batch is dropped.
  * ``shuffle=False`` (evaluation): windows from offset 0, in order; the last
    batch is padded and every batch carries a ``mask`` (1 = real window), as
    :class:`flaxtrain.DataLoader` does with ``remainder='pad'``.

  Batches are dicts ``{'input': (batch, context) int32, 'target': ...}``.

  Args:
    tokens: 1-D integer token ids.
    context: tokens per window, a positive int.
    batch_size: windows per batch, a positive int.
    shuffle: random offsets and order (training) or neither (evaluation).
    seed: fixes the offsets and orders.
    vocab_size: if given, every token id must be below it (the model's
      ``vocab_size``); checked here, before any training. ``max_token_id``
      and :meth:`check_vocab_size` check it later.

  Example:
    >>> loader = TextLoader(splits.train, context=64, batch_size=32)  # doctest: +SKIP
    >>> history = ft.fit(model, optimizer, loader, epochs=3,           # doctest: +SKIP
    ...                  loss_fn=next_token_loss)
  """

  def __init__(self, tokens: Any, context: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
               vocab_size: int | None = None):
    checks.check_int('context', context)
    checks.check_int('batch_size', batch_size)
    checks.check_int('seed', seed, minimum=0)
    tokens = _check_tokens('tokens', tokens)
    if tokens.max() > np.iinfo(np.int32).max:
      raise ValueError(f'tokens: expected ids that fit in int32, got {tokens.max()}')
    self.tokens = tokens.astype(np.int32)
    self.max_token_id = int(self.tokens.max())  # what a model's vocab_size must exceed
    if vocab_size is not None:
      self.check_vocab_size(vocab_size, name='tokens')
    self.context = context
    self.batch_size = batch_size
    self.shuffle = bool(shuffle)
    self.seed = seed
    n = len(self.tokens)
    # Every offset in [0, context) must leave the same number of full windows.
    self.num_examples = (n - context) // context if shuffle else (n - 1) // context
    if self.num_examples < 1:
      need = 2 * context if shuffle else context + 1
      raise ValueError(f'tokens: expected at least {need} tokens for context={context}, got {n}')
    if shuffle and batch_size > self.num_examples:
      raise ValueError(f'batch_size: expected at most the number of windows ({self.num_examples}), got {batch_size}')

  def check_vocab_size(self, vocab_size: int, *, name: str = 'train_loader') -> None:
    """Raises ValueError, naming ``name``, if a token id is not below ``vocab_size``.

    An embedding looked up at an id past its table gives NaN or garbage
    under ``jit``, not an error, so check before training.

    Args:
      vocab_size: the model's vocabulary size (``TransformerLM.vocab_size``).
      name: how the error names this loader.

    Example:
      >>> TextLoader(np.arange(70) % 65, 8, 2).check_vocab_size(65)
    """
    checks.check_int('vocab_size', vocab_size)
    if self.max_token_id >= vocab_size:
      raise ValueError(
          f'{name}: expected token ids below the model\'s vocab_size ({vocab_size}), got ids up to '
          f'{self.max_token_id}; build the model with vocab_size=vocab.size of the CharVocab that '
          'encoded these tokens'
      )

  def __len__(self) -> int:
    """Batches per epoch."""
    if self.shuffle:
      return self.num_examples // self.batch_size
    return -(-self.num_examples // self.batch_size)

  def windows(self, epoch: int = 0) -> dict[str, np.ndarray]:
    """All ``(input, target)`` windows of ``epoch``, in the order they are batched."""
    count, size = self.num_examples, self.context
    if self.shuffle:
      rng = np.random.default_rng([self.seed, epoch])
      offset, order = int(rng.integers(size)), rng.permutation(count)
    else:
      offset, order = 0, np.arange(count)
    rows = self.tokens[offset:offset + count * size + 1]
    starts = order * size
    index = starts[:, None] + np.arange(size + 1)[None, :]
    cut = rows[index]
    return {'input': cut[:, :-1], 'target': cut[:, 1:]}

  def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields the batches of ``epoch``, beginning at batch index ``start``."""
    if not 0 <= start <= len(self):
      raise ValueError(f'start: expected a batch index in [0, {len(self)}], got {start}')
    windows = self.windows(epoch)
    for b in range(start, len(self)):
      batch = {k: v[b * self.batch_size:(b + 1) * self.batch_size] for k, v in windows.items()}
      real = len(batch['input'])
      if not self.shuffle:
        pad = self.batch_size - real
        batch = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}
        batch['mask'] = (np.arange(self.batch_size) < real).astype(np.float32)
      yield batch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.epoch(0)

  @property
  def scored_tokens(self) -> np.ndarray:
    """With ``shuffle=False``, the stretch of ``tokens`` whose characters 2.. are targets.

    Scoring a baseline on exactly these tokens compares it with a model on the
    same characters.
    """
    return self.tokens[:self.num_examples * self.context + 1]


def _unigram_probs(train: np.ndarray, vocab_size: int, smoothing: float) -> np.ndarray:
  counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
  return (counts + smoothing) / (counts.sum() + smoothing * vocab_size)


def _check_baseline_args(train: Any, tokens: Any, vocab_size: Any, smoothing: Any) -> tuple[np.ndarray, np.ndarray]:
  checks.check_int('vocab_size', vocab_size)
  checks.check_real('smoothing', smoothing, expected='a finite number > 0', valid=lambda v: v > 0)
  train, tokens = _check_tokens('train', train), _check_tokens('tokens', tokens)
  for name, array in (('train', train), ('tokens', tokens)):
    if array.max() >= vocab_size:
      raise ValueError(f'{name}: expected token ids < vocab_size ({vocab_size}), got {array.max()}')
  return train, tokens


def unigram_bits_per_char(train: Any, tokens: Any, vocab_size: int, *, smoothing: float = 1.0) -> float:
  """Bits per character of the character frequencies of ``train`` on ``tokens[1:]``.

  The model ignores context: ``p(c) = (count(c) + smoothing) / (n + smoothing
  * vocab_size)``. It scores ``tokens[1:]``, the same characters that
  :func:`bigram_bits_per_char` and a model fed windows of ``tokens`` predict.

  Args:
    train: 1-D token ids to count.
    tokens: 1-D token ids to score.
    vocab_size: number of distinct tokens.
    smoothing: pseudo-count added to every character (> 0), so that a
      character never seen in ``train`` is not infinitely surprising.

  Returns:
    The mean of ``-log2 p(c)`` over ``tokens[1:]``.

  Example:
    >>> unigram_bits_per_char([0, 1, 0, 1], [0, 1, 1, 0], vocab_size=2)
    1.0
  """
  train, tokens = _check_baseline_args(train, tokens, vocab_size, smoothing)
  probs = _unigram_probs(train, vocab_size, smoothing)
  return float(-np.mean(np.log2(probs[tokens[1:]])))


def bigram_bits_per_char(train: Any, tokens: Any, vocab_size: int, *, smoothing: float = 1.0) -> float:
  """Bits per character of ``p(next | previous)`` counted on ``train``, on ``tokens``.

  The counts of each pair are smoothed towards the unigram frequencies::

      p(b | a) = (count(a, b) + smoothing * p(b)) / (count(a) + smoothing)

  so a pair never seen in ``train`` falls back on how common ``b`` is.

  Args:
    train: 1-D token ids to count pairs in.
    tokens: 1-D token ids to score: ``tokens[i + 1]`` given ``tokens[i]``.
    vocab_size: number of distinct tokens.
    smoothing: weight (> 0) of the unigram fallback, in pseudo-counts.

  Returns:
    The mean of ``-log2 p(tokens[i + 1] | tokens[i])``.

  Example:
    >>> bigram_bits_per_char([0, 1] * 50, [0, 1, 0, 1], vocab_size=2) < 0.1
    True
  """
  train, tokens = _check_baseline_args(train, tokens, vocab_size, smoothing)
  unigram = _unigram_probs(train, vocab_size, 1.0)
  pairs = np.zeros((vocab_size, vocab_size))
  np.add.at(pairs, (train[:-1], train[1:]), 1.0)
  probs = (pairs + smoothing * unigram[None, :]) / (pairs.sum(axis=1, keepdims=True) + smoothing)
  return float(-np.mean(np.log2(probs[tokens[:-1], tokens[1:]])))


def next_token_loss(model: nnx.Module, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-character cross-entropy (nats) of ``model`` on ``{'input', 'target'[, 'mask']}``.

  Args:
    model: maps ``input`` ``(batch, length)`` to logits ``(batch, length, vocab)``.
    batch: ``input`` and ``target`` int arrays of the same shape, and
      optionally ``mask`` ``(batch,)``: 1 for a real window, 0 for padding.

  Returns:
    ``(loss, {'bits_per_char': loss / ln 2})``.

  Example:
    >>> history = ft.fit(model, optimizer, loader, epochs=1, loss_fn=next_token_loss)  # doctest: +SKIP
  """
  inputs, targets = batch['input'], batch['target']
  checks.check_shape('target', targets, jnp.shape(inputs), 'same as input')
  logits = model(inputs)
  if jnp.shape(logits)[:-1] != jnp.shape(targets):
    raise ValueError(f'model: expected logits of shape {jnp.shape(targets)} + (vocab,), got {jnp.shape(logits)}')
  mask = batch.get('mask')
  if mask is not None:
    checks.check_shape('mask', mask, jnp.shape(targets)[:1], 'one weight per window')
    mask = jnp.broadcast_to(jnp.asarray(mask)[:, None], jnp.shape(targets)).reshape(-1)
  loss = softmax_cross_entropy_with_integer_labels(
      logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), targets.reshape(-1), mask
  )
  return loss, {'bits_per_char': loss / _LN2}


@functools.partial(jax.jit, static_argnames=('graphdef', 'context', 'num_new'))
def _sample_tokens(graphdef, state, buffer, length, key, temperature, *, context, num_new):
  """Appends ``num_new`` sampled tokens to ``buffer[:length]``; one compiled loop."""
  model = nnx.merge(graphdef, state)

  def body(i, buffer):
    current = length + i
    start = jnp.maximum(current - context, 0)
    window = jax.lax.dynamic_slice(buffer, (start,), (context,))
    # Causal: positions after current - 1 in the window (not yet written) do not matter.
    logits = model(window[None])[0, current - 1 - start]
    token = jax.random.categorical(jax.random.fold_in(key, i), logits.astype(jnp.float32) / temperature)
    return buffer.at[current].set(token.astype(buffer.dtype))

  return jax.lax.fori_loop(0, num_new, body, buffer)


def sample_text(
    model: nnx.Module, vocab: CharVocab, prompt: str, num_chars: int, *, seed: int, temperature: float = 1.0
) -> str:
  """``prompt`` followed by ``num_chars`` characters sampled from ``model``, one at a time.

  Each new character is drawn from ``softmax(logits / temperature)`` at the
  last position, with the model reading at most its last ``model.context``
  characters. The draws depend only on ``seed``, so the same model and seed
  give the same text.

  Args:
    model: a language model with a ``context`` attribute (e.g.
      :class:`flaxtrain.TransformerLM`), mapping ``(batch, length)`` tokens to
      logits ``(batch, length, vocab.size)``.
    vocab: encodes ``prompt`` and decodes the result.
    prompt: a non-empty string of characters of ``vocab``.
    num_chars: characters to generate, a positive int.
    seed: fixes the draws.
    temperature: > 0; below 1 sharpens the distribution, above 1 flattens it.

  Returns:
    ``prompt`` and the generated characters, as one string.

  Example:
    >>> sample_text(model, vocab, 'The "for" statement', 200, seed=0)  # doctest: +SKIP
  """
  if not isinstance(vocab, CharVocab):
    raise TypeError(f'vocab: expected a CharVocab, got {type(vocab).__name__}')
  if not isinstance(prompt, str) or not prompt:
    raise ValueError(f'prompt: expected a non-empty string, got {prompt!r}')
  checks.check_int('num_chars', num_chars)
  checks.check_int('seed', seed, minimum=0)
  temperature = checks.check_real('temperature', temperature, expected='a finite number > 0', valid=lambda v: v > 0)
  context = getattr(model, 'context', None)
  if not isinstance(context, int) or context < 1:
    raise TypeError(f'model: expected a language model with an int `context` attribute, got {type(model).__name__}')
  vocab_size = getattr(model, 'vocab_size', vocab.size)
  if vocab_size != vocab.size:
    raise ValueError(f'vocab: expected {vocab_size} characters, the model\'s vocab_size, got {vocab.size}')
  tokens = vocab.encode(prompt)
  total = len(tokens) + num_chars
  buffer = np.zeros(max(total, context), dtype=np.int32)
  buffer[:len(tokens)] = tokens
  graphdef, state = nnx.split(model)
  out = _sample_tokens(graphdef, state, jnp.asarray(buffer), jnp.int32(len(tokens)), jax.random.key(seed),
                       jnp.float32(temperature), context=context, num_new=num_chars)
  return vocab.decode(np.asarray(out)[:total])
