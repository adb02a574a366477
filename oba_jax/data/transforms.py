"""Per-image preprocessing: pure numpy/PIL functions on uint8 HWC arrays.

Random transforms take `(image, rng)` with a `np.random.Generator` that grain seeds
from the pipeline seed and the example's position, so augmentation is reproducible.
"""

import math

import numpy as np
from PIL import Image


def random_crop(
    image: np.ndarray, rng: np.random.Generator, *, size: int, padding: int
) -> np.ndarray:
  """Zero-pads `padding` pixels on each side, then crops a random `size` x `size` window."""
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top = rng.integers(0, padded.shape[0] - size, endpoint=True)
  left = rng.integers(0, padded.shape[1] - size, endpoint=True)
  return padded[top : top + size, left : left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors the image left-right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """Crops a random box covering `scale` of the image's area with aspect (width/height)
  in `ratio`, resized to `size` x `size` (Inception-style augmentation)."""
  box = _random_box(image.shape[:2], rng, scale, ratio)
  return _resize_box(image, box, (size, size))


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  height, width = image.shape[:2]
  factor = size / min(height, width)
  new_size = (max(size, round(width * factor)), max(size, round(height * factor)))
  return _resize_box(image, (0, 0, width, height), new_size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Crops the central `size` x `size` window."""
  top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
  return image[top : top + size, left : left + size]


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """Maps uint8 pixels to float32 `(pixel / 255 - mean) / std`, per channel."""
  return (image.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)


def _random_box(
    shape: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Samples a (left, top, right, bottom) box for `random_resized_crop`; after
  `attempts` boxes that do not fit, returns the largest central box within `ratio`."""
  height, width = shape
  for _ in range(attempts):
    area = height * width * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    box_w, box_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < box_w <= width and 0 < box_h <= height:
      left = int(rng.integers(0, width - box_w, endpoint=True))
      top = int(rng.integers(0, height - box_h, endpoint=True))
      return left, top, left + box_w, top + box_h
  aspect = min(max(width / height, ratio[0]), ratio[1])
  box_w, box_h = min(width, round(height * aspect)), min(height, round(width / aspect))
  left, top = (width - box_w) // 2, (height - box_h) // 2
  return left, top, left + box_w, top + box_h


def _resize_box(
    image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]
) -> np.ndarray:
  """Bilinearly resizes the (left, top, right, bottom) `box` of `image` to `size`,
  given as (width, height) like PIL."""
  grey = image.shape[2] == 1  # PIL wants greyscale images as 2-D arrays
  pil_image = Image.fromarray(image[..., 0] if grey else image)
  resized = np.asarray(pil_image.resize(size, Image.Resampling.BILINEAR, box=box))
  return resized[..., None] if grey else resized
