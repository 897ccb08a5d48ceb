"""Digits splits and the seeded DataLoader."""

import numpy as np
import pytest

import flaxtrain as ft


@pytest.fixture(scope='module')
def splits():
  return ft.load_digits(seed=0)


def test_digits_split_sizes_are_disjoint_and_cover_the_data(splits):
  sizes = [len(s['label']) for s in (splits.train, splits.val, splits.test)]
  assert sizes == [1077, 360, 360] and sum(sizes) == 1797
  rows = np.concatenate([s['image'].reshape(len(s['image']), -1) for s in (splits.train, splits.val, splits.test)])
  # Every image appears exactly once: compare against the raw data set.
  from sklearn.datasets import load_digits
  raw = load_digits().images.reshape(1797, -1).astype(np.float32)
  restored = rows * splits.std + splits.mean
  raw_sorted = raw[np.lexsort(raw.T)]
  restored_sorted = restored[np.lexsort(np.round(restored).T)]
  np.testing.assert_allclose(restored_sorted, raw_sorted, atol=1e-4)


def test_digits_normalised_with_training_statistics_only(splits):
  image = splits.train['image']
  assert image.dtype == np.float32 and image.shape[1:] == (8, 8, 1)
  np.testing.assert_allclose(image.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(image.std(), 1.0, atol=1e-5)
  assert abs(splits.val['image'].mean()) > 1e-4  # not re-centred on its own statistics
  assert splits.train['label'].dtype == np.int32


def test_digits_split_is_stratified_and_seeded(splits):
  assert set(np.bincount(splits.test['label'])) <= {35, 36, 37}
  again = ft.load_digits(seed=0)
  np.testing.assert_array_equal(again.val['label'], splits.val['label'])
  other = ft.load_digits(seed=1)
  assert not np.array_equal(other.val['label'], splits.val['label'])


@pytest.mark.parametrize('kwargs, match', [
    (dict(val_fraction=0.0), r'val_fraction: expected a fraction in \(0, 1\), got 0.0'),
    (dict(test_fraction=1.5), 'test_fraction: expected a fraction'),
    (dict(val_fraction=0.6, test_fraction=0.5), 'val_fraction \\+ test_fraction: expected < 1'),
])
def test_digits_bad_fractions(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ft.load_digits(**kwargs)


def toy(n=10):
  return {'x': np.arange(n, dtype=np.float32), 'y': np.arange(n, dtype=np.int32) * 10}


def test_loader_drops_the_remainder_and_keeps_pairs_together():
  loader = ft.DataLoader(toy(10), 3, seed=0)
  batches = list(loader)
  assert len(loader) == len(batches) == 3
  assert all(b['x'].shape == (3,) for b in batches)
  for b in batches:
    np.testing.assert_array_equal(b['y'], b['x'].astype(np.int32) * 10)
  seen = np.concatenate([b['x'] for b in batches])
  assert len(set(seen)) == 9  # 9 distinct examples, one left out


def test_loader_pads_the_last_batch_with_a_mask():
  loader = ft.DataLoader(toy(10), 4, shuffle=False, remainder='pad')
  batches = list(loader)
  assert [b['x'].shape for b in batches] == [(4,), (4,), (4,)]
  np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 0, 0])
  assert all(b['mask'].sum() == 4 for b in batches[:-1])
  real = np.concatenate([b['x'][b['mask'] == 1] for b in batches])
  np.testing.assert_array_equal(real, np.arange(10))


def test_loader_reshuffles_each_epoch_deterministically():
  first = ft.DataLoader(toy(40), 8, seed=3)
  second = ft.DataLoader(toy(40), 8, seed=3)
  epoch0, epoch1 = [np.concatenate([b['x'] for b in first]) for _ in range(2)]
  assert not np.array_equal(epoch0, epoch1), 'each epoch must have a new order'
  np.testing.assert_array_equal(epoch0, np.concatenate([b['x'] for b in second]))
  assert first.next_epoch == 2


def test_loader_epoch_resumes_from_any_batch():
  loader = ft.DataLoader(toy(40), 8, seed=3)
  full = list(loader.epoch(5))
  tail = list(loader.epoch(5, start=2))
  assert len(tail) == 3
  for a, b in zip(full[2:], tail):
    np.testing.assert_array_equal(a['x'], b['x'])


@pytest.mark.parametrize('data, kwargs, match', [
    (toy(5), dict(batch_size=6), r"batch_size: expected at most the number of examples \(5\) with remainder='drop'.*got 6"),
    (toy(5), dict(batch_size=0), 'batch_size: expected a positive int, got 0'),
    (toy(5), dict(batch_size=2.0), 'batch_size: expected a positive int, got 2.0'),
    ({'x': np.zeros(0)}, dict(batch_size=1), 'data: expected at least one example, got an empty split'),
    ({}, dict(batch_size=1), 'data: expected a non-empty dict of arrays'),
    ({'x': np.zeros(3), 'y': np.zeros(4)}, dict(batch_size=1), 'data: expected arrays of equal length'),
    (toy(5), dict(batch_size=2, remainder='keep'), "remainder: expected 'drop' or 'pad', got 'keep'"),
])
def test_loader_bad_input(data, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ft.DataLoader(data, **kwargs)


def test_loader_bad_start():
  with pytest.raises(ValueError, match=r'start: expected a batch index in \[0, 2\], got 3'):
    list(ft.DataLoader(toy(5), 2).epoch(0, start=3))


def test_loader_pads_a_batch_larger_than_the_data():
  loader = ft.DataLoader(toy(5), batch_size=8, shuffle=False, remainder='pad')
  (batch,) = list(loader.epoch(0))
  assert len(loader) == 1 and batch['x'].shape[0] == 8
  np.testing.assert_array_equal(batch['mask'], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.sort(batch['x'][batch['mask'] == 1], axis=0), np.sort(toy(5)['x'], axis=0))


@pytest.mark.parametrize('data, error, match', [
    ((np.zeros((100, 8)), np.zeros(100)), TypeError, r"data: expected a dict of arrays such as \{'image': x, 'label': y\}, got a tuple of 2"),
    ({'image': 'digits.npz'}, TypeError, r"data\['image'\]: expected an array with one row per example, got a string"),
    ({'image': np.float32(3.0)}, ValueError, r"data\['image'\]: expected an array with one row per example, got a scalar"),
    ({'image': [[1.0, 2.0], [3.0]]}, ValueError, r"data\['image'\]: expected rows of equal shape, got a ragged sequence"),
    ({'image': np.array(['a', 'b'])}, TypeError, r"data\['image'\]: expected a numeric or bool array, got dtype <U1"),
], ids=['tuple', 'str', 'zero_d', 'ragged', 'strings'])
def test_loader_rejects_data_that_is_not_a_dict_of_row_arrays(data, error, match):
  with pytest.raises(error, match=match) as caught:
    ft.DataLoader(data, 2)
  assert len(str(caught.value)) < 300  # the message never prints a whole array


def test_loader_init_has_useful_help():
  import inspect
  doc = inspect.getdoc(ft.DataLoader.__init__)
  for word in ('data:', 'batch_size:', 'remainder:', "'pad'", 'mask'):
    assert word in doc
