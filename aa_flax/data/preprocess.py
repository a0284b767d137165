"""Per-example preprocessing in numpy (host side, inside the grain pipeline).

Every function maps a ``uint8 [H, W, C]`` image to a ``uint8 [h, w, C]`` image, ``size = (h, w)``;
random ones take a ``np.random.Generator`` that grain seeds from ``(seed, example index)``,
so the result is a deterministic function of the seed and the position in the data stream.
Normalisation (``(x/255 - mean) / std``) happens on the accelerator, so batches cross the
host-device link as uint8.

Augmentations (``config.data.augment``):
  * ``none``: resize to ``size`` if needed (eval is the same).
  * ``flip``: random horizontal flip.
  * ``cifar``: zero-pad 4 pixels, random ``h x w`` crop, random horizontal flip.
  * ``inception``: Inception-style random-resized crop (area 8%-100%, aspect 3/4-4/3) to
    ``size``, random flip; eval takes the central 87.5% square and resizes it to ``size``.
"""

from __future__ import annotations

import numpy as np

from aa_flax.errors import ConfigError

AUGMENTATIONS = ("none", "flip", "cifar", "inception")
CIFAR_PAD = 4
EVAL_CROP_FRACTION = 0.875


Size = tuple[int, int]  # (height, width) of the output image


def resize(image: np.ndarray, size: Size) -> np.ndarray:
  """Bilinear resize of ``uint8 [H, W, C]`` to ``uint8 [size[0], size[1], C]`` (PIL, per channel)."""
  if image.shape[:2] == tuple(size):
    return image
  from PIL import Image
  channels = [np.asarray(Image.fromarray(image[..., c]).resize((size[1], size[0]), Image.BILINEAR))
              for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1)


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors ``image [H, W, C]`` left-right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def pad_random_crop(image: np.ndarray, rng: np.random.Generator, size: Size,
                    pad: int = CIFAR_PAD) -> np.ndarray:
  """Zero-pads ``image [H, W, C]`` by ``pad`` and takes a random ``[*size, C]`` crop."""
  image = resize(image, size)
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  return padded[top:top + size[0], left:left + size[1]]


def inception_crop_box(height: int, width: int, rng: np.random.Generator,
                       area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3),
                       attempts: int = 10) -> tuple[int, int, int, int]:
  """Samples ``(top, left, crop_height, crop_width)`` as Inception's distorted bounding box.

  Area fraction uniform in ``area_range``, log-aspect uniform in ``aspect_range``; after
  ``attempts`` failures it falls back to the central crop of the clipped aspect ratio.
  """
  area = height * width
  log_ratio = np.log(aspect_range)
  for _ in range(attempts):
    target_area = area * rng.uniform(*area_range)
    aspect = np.exp(rng.uniform(*log_ratio))
    crop_w = int(round(np.sqrt(target_area * aspect)))
    crop_h = int(round(np.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  aspect = width / height
  if aspect < aspect_range[0]:
    crop_w, crop_h = width, int(round(width / aspect_range[0]))
  elif aspect > aspect_range[1]:
    crop_h, crop_w = height, int(round(height * aspect_range[1]))
  else:
    crop_h, crop_w = height, width
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def inception_crop(image: np.ndarray, rng: np.random.Generator, size: Size) -> np.ndarray:
  """Random-resized crop of ``image [H, W, C]`` to ``[*size, C]``."""
  top, left, crop_h, crop_w = inception_crop_box(image.shape[0], image.shape[1], rng)
  return resize(image[top:top + crop_h, left:left + crop_w], size)


def center_crop(image: np.ndarray, size: Size,
                crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
  """Central square of side ``crop_fraction * min(H, W)`` of ``image``, resized to ``size``."""
  side = max(1, int(round(crop_fraction * min(image.shape[0], image.shape[1]))))
  top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
  return resize(image[top:top + side, left:left + side], size)


def check_augment(augment: str) -> None:
  if augment not in AUGMENTATIONS:
    raise ConfigError(f"Unknown config.data.augment={augment!r}; valid: "
                      f"{', '.join(AUGMENTATIONS)}.")


def train_transform(augment: str, size: Size):
  """``(record, rng) -> record`` for training; ``record['image']`` becomes ``[*size, C]``."""
  check_augment(augment)

  def transform(record, rng: np.random.Generator):
    image = _as_hwc(record["image"])
    if augment == "cifar":
      image = random_flip(pad_random_crop(image, rng, size), rng)
    elif augment == "inception":
      image = random_flip(inception_crop(image, rng, size), rng)
    elif augment == "flip":
      image = random_flip(resize(image, size), rng)
    else:
      image = resize(image, size)
    return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}

  return transform


def eval_transform(augment: str, size: Size):
  """``record -> record`` for evaluation (central crop for ``inception``, else resize)."""
  check_augment(augment)

  def transform(record):
    image = _as_hwc(record["image"])
    image = center_crop(image, size) if augment == "inception" else resize(image, size)
    return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}

  return transform


def _as_hwc(image) -> np.ndarray:
  image = np.asarray(image)
  return image[..., None] if image.ndim == 2 else image
