"""Images as the drivers handle them: uint8 <-> [-1, 1] floats, grids and PNG encoding.

The model sees floats in [-1, 1] (x = u / 127.5 - 1, the original's scaling); everything a user
keeps (sample dumps, grids) is uint8, rounded to the nearest of the 256 levels.
"""
from __future__ import annotations

import io
import math

import jax.numpy as jnp
import numpy as np


def to_float(images_uint8):
  """uint8 [..., H, W, C] in 0..255 -> float32 in [-1, 1] (NumPy or JAX, traceable)."""
  xp = jnp if not isinstance(images_uint8, np.ndarray) else np
  return xp.asarray(images_uint8).astype(xp.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """Floats in [-1, 1] -> uint8 in 0..255: rounded to the nearest level, clipped."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def to_uint8_values(images):
  """`to_uint8`'s levels as float32 (traceable: on device, before the Inception network)."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0.0, 255.0)


def image_grid(images_NxHxWxC: np.ndarray, pad: int = 2, cols: int | None = None,
               labels=None) -> np.ndarray:
  """uint8 images -> one uint8 grid image, `pad` black pixels apart.

  Args:
    images_NxHxWxC: the images.
    pad: black pixels between images and around the grid.
    cols: images per row, filled row by row; by default as square as possible.
    labels: each image's class (a class-conditional model's samples), instead of `cols`: one
      column per class present, in increasing order, each holding that class's images top to
      bottom, so that every column shows one label.

  Returns:
    uint8 [rows * (H + pad) + pad, cols * (W + pad) + pad, C].
  """
  n, h, w, c = images_NxHxWxC.shape
  if labels is not None:
    if cols is not None:
      raise ValueError("image_grid: give `cols` or `labels`, not both (labels give one column "
                       "per class)")
    labels = np.asarray(labels)
    if labels.shape != (n,):
      raise ValueError(f"image_grid: {n} images but labels of shape {labels.shape}; give one "
                       f"label per image")
    classes, columns = np.unique(labels, return_inverse=True)
    columns = columns.reshape(-1)
    # Row of each image: how many images of its class came before it.
    order = np.argsort(columns, kind="stable")
    counts = np.bincount(columns, minlength=len(classes))
    rows_at = np.empty(n, np.int64)
    rows_at[order] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = len(classes)
    rows = int(rows_at.max()) + 1 if n else 0
    places = zip(rows_at.tolist(), columns.tolist())
  else:
    cols = int(math.ceil(math.sqrt(n))) if cols is None else cols
    rows = int(math.ceil(n / cols))
    places = (divmod(i, cols) for i in range(n))
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for image, (r, col) in zip(images_NxHxWxC, places):
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


def rows_grid(rows_NxKxHxWxC) -> np.ndarray:
  """Float images in [-1, 1], one row of K per n -> a uint8 grid with K columns."""
  images = to_uint8(rows_NxKxHxWxC)
  n, k = images.shape[:2]
  return image_grid(images.reshape((n * k,) + images.shape[2:]), cols=k)


def encode_png(image_HxWxC: np.ndarray, upscale: int = 1) -> bytes:
  """A uint8 image (C = 1 or 3) as PNG bytes, optionally enlarged `upscale` times (nearest)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(image_HxWxC[..., 0] if image_HxWxC.shape[-1] == 1 else image_HxWxC)
  if upscale > 1:
    pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.Resampling.NEAREST)
  buf = io.BytesIO()
  pil.save(buf, format="PNG")
  return buf.getvalue()


def grid_upscale(image_size: int, target: int = 128) -> int:
  """How many times to enlarge a grid of image_size images so each is about `target` pixels."""
  return max(1, target // image_size)
