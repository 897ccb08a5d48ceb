"""Data: the digits set that ships with scikit-learn, and a seeded batch loader.

Batches are dicts of NumPy arrays, ``{'image': ..., 'label': ...}``. The
order of epoch ``e`` depends only on ``(seed, e)``, so a run can be resumed
from ``(epoch, batch index)`` and see exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np

from flaxtrain import checks

__all__ = ['Splits', 'load_digits', 'DataLoader']

Arrays = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Splits:
  """Train, validation and test arrays, normalised with training statistics.

  Attributes:
    train, val, test: dicts with ``image`` (N, 8, 8, 1) float32 and ``label``
      (N,) int32.
    mean, std: the scalar pixel statistics of the training split that were
      used to normalise all three splits.
    num_classes: 10 for digits.
  """

  train: dict[str, np.ndarray]
  val: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  mean: float
  std: float
  num_classes: int


def load_digits(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Splits:
  """scikit-learn's 8x8 digits (1,797 images), split and normalised; no download.

  The split is stratified by class and fixed by ``seed``. Pixels are scaled
  with the mean and standard deviation of the *training* split only, so
  nothing about validation or test leaks into training.

  Args:
    seed: fixes the split.
    val_fraction: fraction of all images for validation, in (0, 1).
    test_fraction: fraction of all images for the held-out test split.

  Returns:
    A :class:`Splits`.

  Example:
    >>> splits = load_digits(seed=0)
    >>> splits.train['image'].shape
    (1077, 8, 8, 1)
  """
  from sklearn import datasets, model_selection  # imported lazily: slow to import

  for name, value in (('val_fraction', val_fraction), ('test_fraction', test_fraction)):
    checks.check_real(name, value, expected='a fraction in (0, 1)', valid=lambda v: 0.0 < v < 1.0)
  if val_fraction + test_fraction >= 1.0:
    raise ValueError(
        f'val_fraction + test_fraction: expected < 1 to leave training data, '
        f'got {val_fraction} + {test_fraction}'
    )
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  rest_x, test_x, rest_y, test_y = model_selection.train_test_split(
      images, labels, test_size=test_fraction, random_state=seed, stratify=labels
  )
  train_x, val_x, train_y, val_y = model_selection.train_test_split(
      rest_x, rest_y, test_size=val_fraction / (1.0 - test_fraction),
      random_state=seed, stratify=rest_y,
  )
  mean, std = float(train_x.mean()), float(train_x.std())

  def split(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return {'image': ((x - mean) / std).astype(np.float32), 'label': y}

  return Splits(
      train=split(train_x, train_y), val=split(val_x, val_y), test=split(test_x, test_y),
      mean=mean, std=std, num_classes=10,
  )


def _as_column(name: str, value: object) -> np.ndarray:
  """``value`` as an array with a leading example axis; errors name the key, not the values."""
  if isinstance(value, (str, bytes)):
    raise TypeError(f'data[{name!r}]: expected an array with one row per example, got a string')
  try:
    array = np.asarray(value)
  except ValueError as error:  # NumPy >= 1.24 refuses ragged nested lists
    raise ValueError(f'data[{name!r}]: expected rows of equal shape, got a ragged sequence') from error
  if array.dtype == object:
    raise ValueError(f'data[{name!r}]: expected rows of equal shape and a numeric dtype, got a ragged or object array')
  if array.ndim == 0:
    raise ValueError(f'data[{name!r}]: expected an array with one row per example, got a scalar ({array.dtype})')
  if not (np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)):
    raise TypeError(f'data[{name!r}]: expected a numeric or bool array, got dtype {array.dtype}')
  return array


class DataLoader:
  """Seeded mini-batches over a dict of equally long arrays.

  Every batch has exactly ``batch_size`` rows, so a jitted step compiles
  once. With ``remainder='drop'`` (training) the last incomplete batch of an
  epoch is dropped; with ``remainder='pad'`` (evaluation) it is padded and
  every batch carries a ``mask`` (1 = real example, 0 = padding), so all
  examples are seen exactly once.

  Iterating over the loader yields one epoch and moves on to the next, with a
  new order each epoch when ``shuffle`` is on. :meth:`epoch` gives any epoch
  directly, from any batch, which is what resuming a run needs.

  Example:
    >>> loader = DataLoader(splits.train, batch_size=64, seed=0)  # doctest: +SKIP
    >>> for batch in loader:  # one epoch                         # doctest: +SKIP
    ...   metrics = train_step(model, optimizer, batch)
  """

  def __init__(
      self,
      data: Arrays,
      batch_size: int,
      *,
      shuffle: bool = True,
      seed: int = 0,
      remainder: Literal['drop', 'pad'] = 'drop',
  ):
    """Checks ``data`` and the options; nothing is copied to a device.

    Args:
      data: a dict of equally long arrays, one row per example, e.g.
        ``{'image': x, 'label': y}`` (the keys the loss reads:
        :func:`flaxtrain.classification_loss` reads ``'image'`` and integer
        ``'label'``). Lists are converted with ``np.asarray``; every value
        must have a leading example axis and a numeric or bool dtype.
      batch_size: rows per batch, a positive int. With ``remainder='drop'``
        at most the number of examples; with ``'pad'`` any size (a batch
        larger than the data is one padded batch).
      shuffle: a new order each epoch, fixed by ``(seed, epoch)``; False
        keeps the data's order (what evaluation wants).
      seed: the seed of the shuffling.
      remainder: ``'drop'`` drops the last incomplete batch (training);
        ``'pad'`` pads it by repeating an example and adds ``mask`` to every
        batch (1 = real, 0 = padding), so every example is seen exactly once
        (evaluation: pass it to the loss and metrics, as
        :func:`flaxtrain.classification_loss` does).

    Raises:
      TypeError: ``data`` is not a dict (e.g. a tuple ``(x, y)``), or a value
        is a string or not numeric.
      ValueError: no examples, arrays of different lengths, a scalar or
        ragged value, or a bad ``batch_size``, ``remainder`` or ``seed``.
    """
    if isinstance(data, (tuple, list)):
      raise TypeError(
          f"data: expected a dict of arrays such as {{'image': x, 'label': y}}, got a "
          f"{type(data).__name__} of {len(data)}; pass DataLoader({{'image': x, 'label': y}}, ...)"
      )
    if not isinstance(data, Mapping) or not data:
      raise ValueError(f'data: expected a non-empty dict of arrays, got {type(data).__name__} {data!r:.60}')
    self.data = {name: _as_column(name, value) for name, value in data.items()}
    lengths = {name: len(array) for name, array in self.data.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f'data: expected arrays of equal length, got lengths {lengths}')
    checks.check_int('batch_size', batch_size)
    checks.check_int('seed', seed, minimum=0)
    if remainder not in ('drop', 'pad'):
      raise ValueError(f"remainder: expected 'drop' or 'pad', got {remainder!r}")
    if not isinstance(shuffle, (bool, np.bool_)):
      raise ValueError(f'shuffle: expected True or False, got {shuffle!r}')
    self._size = next(iter(lengths.values()))
    if self._size == 0:
      raise ValueError('data: expected at least one example, got an empty split')
    if batch_size > self._size and remainder == 'drop':
      raise ValueError(
          f'batch_size: expected at most the number of examples ({self._size}) with '
          f"remainder='drop', which would give no batch at all; got {batch_size} (use remainder='pad' "
          'for one padded batch)'
      )
    self.batch_size = batch_size
    self.shuffle = bool(shuffle)
    self.seed = seed
    self.remainder = remainder
    self.next_epoch = 0

  @property
  def num_examples(self) -> int:
    """Examples in the data set."""
    return self._size

  def __len__(self) -> int:
    """Batches per epoch."""
    if self.remainder == 'drop':
      return self._size // self.batch_size
    return -(-self._size // self.batch_size)

  def order(self, epoch: int) -> np.ndarray:
    """The permutation of example indices used in ``epoch``."""
    if not self.shuffle:
      return np.arange(self._size)
    return np.random.default_rng([self.seed, epoch]).permutation(self._size)

  def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields the batches of ``epoch``, beginning at batch index ``start``."""
    if not 0 <= start <= len(self):
      raise ValueError(f'start: expected a batch index in [0, {len(self)}], got {start}')
    order = self.order(epoch)
    for b in range(start, len(self)):
      index = order[b * self.batch_size:(b + 1) * self.batch_size]
      real = len(index)
      if real < self.batch_size:  # only with remainder='pad'
        index = np.concatenate([index, np.repeat(index[:1], self.batch_size - real)])
      batch = {name: array[index] for name, array in self.data.items()}
      if self.remainder == 'pad':
        batch['mask'] = (np.arange(self.batch_size) < real).astype(np.float32)
      yield batch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
    return self.epoch(epoch)
