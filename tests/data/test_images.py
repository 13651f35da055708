"""Grids: square for unconditional samples, one column per class for class-conditional ones."""
import numpy as np
import pytest

from diffusion_jax.data import images as images_lib


def numbered(n: int, size: int = 2) -> np.ndarray:
  """n uint8 images, image i filled with the value i + 1 (0 is the padding)."""
  return np.broadcast_to((np.arange(n) + 1).astype(np.uint8)[:, None, None, None],
                         (n, size, size, 1)).copy()


def layout(grid: np.ndarray, size: int = 2, pad: int = 1) -> np.ndarray:
  """The value of each cell of a grid (0: empty), as [rows, cols]."""
  return grid[pad::size + pad, pad::size + pad, 0]


def test_class_conditional_grid_has_one_column_per_class():
  """64 samples of 10 classes, sample i of class i mod 10 (the samplers' default): 10 columns,
  column c holding exactly the samples of class c."""
  labels = np.arange(64) % 10
  grid = images_lib.image_grid(numbered(64), pad=1, labels=labels)
  assert grid.shape == (7 * 3 + 1, 10 * 3 + 1, 1)
  cells = layout(grid)
  assert cells.shape == (7, 10)
  for i in range(64):
    assert cells[i // 10, labels[i]] == i + 1
  assert np.count_nonzero(cells) == 64


def test_the_columns_follow_the_labels_in_any_order():
  """Each image in its class's column, top to bottom in the order given; only the classes
  present get a column."""
  labels = np.array([7, 2, 7, 7, 2, 5])
  cells = layout(images_lib.image_grid(numbered(6), pad=1, labels=labels))
  np.testing.assert_array_equal(cells, [[2, 6, 1],
                                        [5, 0, 3],
                                        [0, 0, 4]])


def test_unconditional_grids_stay_square():
  grid = images_lib.image_grid(numbered(64), pad=1)
  np.testing.assert_array_equal(layout(grid), np.arange(1, 65).reshape(8, 8))


def test_grid_errors_say_what_to_give():
  with pytest.raises(ValueError, match="one label per image"):
    images_lib.image_grid(numbered(4), labels=[0, 1, 2])
  with pytest.raises(ValueError, match="`cols` or `labels`, not both"):
    images_lib.image_grid(numbered(4), cols=2, labels=[0, 1, 0, 1])
