"""Per-example preprocessing in numpy and PIL (host side, inside the grain pipeline).

A record's ``image`` is either decoded, ``uint8 [H, W, C]``, or an encoded image file
(``bytes``: JPEG, PNG, ...; decoded to RGB here). Every transform returns ``uint8 [h, w, C]``
with ``size = (h, w)``. Random ones take a ``np.random.Generator`` that grain seeds from
``(seed, example index)``, so the result is a deterministic function of the seed and the
position in the data stream. Normalisation (``(x/255 - mean) / std``) happens on the
accelerator, so batches cross the host-device link as uint8.

Augmentations (``config.data.augment``):
  * ``none``: resize to ``size`` if needed (eval is the same).
  * ``flip``: random horizontal flip.
  * ``cifar``: zero-pad 4 pixels, random ``h x w`` crop, random horizontal flip.
  * ``inception``: Inception-style random-resized crop (area 8%-100%, aspect 3/4-4/3) to
    ``size``, random flip; eval takes the central 87.5% square and resizes it to ``size``.

Crops are resized in one bilinear PIL call on the crop box (all channels at once). An
encoded JPEG is decoded at 1/2, 1/4 or 1/8 scale (the decoder's DCT scaling, much cheaper
than a full decode) when the crop box still covers at least ``size`` pixels at that scale.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Union

import numpy as np

from aa_flax.errors import ConfigError

AUGMENTATIONS = ("none", "flip", "cifar", "inception")
CIFAR_PAD = 4
EVAL_CROP_FRACTION = 0.875
JPEG_SCALES = (8, 4, 2)  # the decoder's power-of-two DCT scale factors, largest first

Size = tuple[int, int]  # (height, width) of the output image
Box = tuple[int, int, int, int]  # (top, left, height, width) of a crop
ImageData = Union[np.ndarray, bytes]  # uint8 [H, W, C] or an encoded image file


def resize(image: np.ndarray, size: Size) -> np.ndarray:
  """Bilinear resize of ``uint8 [H, W, C]`` to ``uint8 [size[0], size[1], C]``.

  One PIL call for 1 or 3 channels; other channel counts go channel by channel.
  """
  if image.shape[:2] == tuple(size):
    return image
  from PIL import Image
  channels = image.shape[-1]
  if channels not in (1, 3):
    return np.stack([resize(image[..., c:c + 1], size)[..., 0] for c in range(channels)],
                    axis=-1)
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
  return resized[..., None] if channels == 1 else resized


def decode(data: bytes) -> np.ndarray:
  """An encoded image file -> ``uint8 [H, W, 3]`` (RGB)."""
  from PIL import Image
  with Image.open(io.BytesIO(data)) as pil:
    return np.asarray(pil.convert("RGB"))


def crop_and_resize(image: ImageData, box_fn: Callable[[int, int], Box], size: Size
                    ) -> np.ndarray:
  """Resizes the crop ``box_fn(H, W) = (top, left, height, width)`` of ``image`` to ``size``.

  ``image`` is ``uint8 [H, W, C]`` or an encoded file; a JPEG is decoded at the largest DCT
  scale ``1/s`` (s in 8, 4, 2) at which the box still spans ``size``. Returns
  ``uint8 [*size, C]`` (``C = 3`` for encoded input).
  """
  if not isinstance(image, (bytes, bytearray, memoryview)):
    image = _as_hwc(image)
    top, left, crop_h, crop_w = box_fn(image.shape[0], image.shape[1])
    return resize(image[top:top + crop_h, left:left + crop_w], size)
  from PIL import Image
  with Image.open(io.BytesIO(image)) as pil:
    width, height = pil.size  # from the header; nothing decoded yet
    top, left, crop_h, crop_w = box_fn(height, width)
    scale = dct_scale(crop_h, crop_w, size)
    if scale > 1 and pil.draft("RGB", (width // scale, height // scale)) is None:
      scale = 1  # not a JPEG: decoded at full size
    if pil.mode != "RGB":
      pil = pil.convert("RGB")
    box = (left / scale, top / scale, (left + crop_w) / scale, (top + crop_h) / scale)
    return np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR, box=box))


def dct_scale(crop_h: int, crop_w: int, size: Size) -> int:
  """Largest JPEG DCT scale divisor ``s`` with the ``crop_h x crop_w`` box at least ``size``
  after scaling by ``1/s``; 1 when none is."""
  for scale in JPEG_SCALES:
    if crop_h >= scale * size[0] and crop_w >= scale * size[1]:
      return scale
  return 1


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
                       attempts: int = 10) -> Box:
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


def center_crop_box(height: int, width: int, crop_fraction: float = EVAL_CROP_FRACTION) -> Box:
  """The central square of side ``crop_fraction * min(height, width)`` as ``(t, l, h, w)``."""
  side = max(1, int(round(crop_fraction * min(height, width))))
  return (height - side) // 2, (width - side) // 2, side, side


def check_augment(augment: str) -> None:
  if augment not in AUGMENTATIONS:
    raise ConfigError(f"Unknown config.data.augment={augment!r}; valid: "
                      f"{', '.join(AUGMENTATIONS)}.")


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """``(record, rng) -> record`` for training; ``record['image']`` becomes ``[*size, C]``.

  A plain picklable object, so grain worker processes can run it.
  """
  augment: str
  size: Size

  def __post_init__(self):
    check_augment(self.augment)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    size, image = self.size, record["image"]
    if self.augment == "inception":
      image = crop_and_resize(image, lambda h, w: inception_crop_box(h, w, rng), size)
      image = random_flip(image, rng)
    elif self.augment == "cifar":
      image = random_flip(pad_random_crop(_as_hwc(image), rng, size), rng)
    elif self.augment == "flip":
      image = random_flip(resize(_as_hwc(image), size), rng)
    else:
      image = resize(_as_hwc(image), size)
    return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """``record -> record`` for evaluation (central crop for ``inception``, else resize)."""
  augment: str
  size: Size

  def __post_init__(self):
    check_augment(self.augment)

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    if self.augment == "inception":
      image = crop_and_resize(record["image"], center_crop_box, self.size)
    else:
      image = resize(_as_hwc(record["image"]), self.size)
    return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}


def _as_hwc(image: ImageData) -> np.ndarray:
  if isinstance(image, (bytes, bytearray, memoryview)):
    return decode(image)
  image = np.asarray(image)
  return image[..., None] if image.ndim == 2 else image
