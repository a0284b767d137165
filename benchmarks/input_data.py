"""Real photos as ImageNet-like JPEGs, written as a tfds dataset or an npz file, plus the
straightforward preprocessing that the fast path in ``aa_flax.data.preprocess`` must match.

The photos are the ones that installed packages ship: scikit-learn's two sample images
(``china.jpg``, ``flower.jpg``), plus matplotlib's ``grace_hopper.jpg`` and scikit-image's
colour test photos when those packages are installed. Each JPEG is a random crop of a photo,
resized to one of ImageNet's common sizes and re-encoded at quality 90.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Sequence

import numpy as np

# (height, width): the most common ImageNet training image sizes (landscape and portrait).
IMAGENET_SIZES = ((375, 500), (333, 500), (500, 375), (500, 333), (375, 500), (400, 500))
JPEG_QUALITY = 90


def sample_photos() -> list[np.ndarray]:
  """Every real colour photo found in installed packages, ``uint8 [H, W, 3]`` each."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = list(load_sample_images().images)
  try:
    from matplotlib import cbook
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
      photos.append(np.asarray(Image.open(handle).convert("RGB")))
  except (ImportError, OSError, ValueError):
    pass
  try:
    from skimage import data as skimage_data
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
      photos.append(getattr(skimage_data, name)())
  except Exception:  # noqa: BLE001 - not installed, or a photo that needs a download
    pass
  return photos


def jpeg_images(count: int, sizes: Sequence[tuple[int, int]] = IMAGENET_SIZES,
                seed: int = 0, quality: int = JPEG_QUALITY) -> list[bytes]:
  """``count`` JPEG files: random crops of the sample photos resized to ``sizes`` (cycled)."""
  from PIL import Image
  photos = sample_photos()
  rng = np.random.default_rng(seed)
  files = []
  for index in range(count):
    photo = photos[index % len(photos)]
    height, width = sizes[index % len(sizes)]
    scale = rng.uniform(0.7, 1.0) * min(photo.shape[0] / height, photo.shape[1] / width)
    crop_h, crop_w = int(height * scale), int(width * scale)
    top = rng.integers(0, photo.shape[0] - crop_h + 1)
    left = rng.integers(0, photo.shape[1] - crop_w + 1)
    crop = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
    buffer = io.BytesIO()
    crop.resize((width, height), Image.BICUBIC).save(buffer, "JPEG", quality=quality)
    files.append(buffer.getvalue())
  return files


def decode_all(files: Sequence[bytes]) -> list[np.ndarray]:
  from PIL import Image
  return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in files]


def write_tfds_imagenet(data_dir: str, splits: dict[str, Sequence[tuple[bytes, int]]]) -> str:
  """Prepares tfds ``imagenet2012`` in ``data_dir`` (ArrayRecord, no TensorFlow needed) from
  ``{'train': [(jpeg, label), ...], 'validation': [...]}``; returns the version directory.

  The real builder's features and version are kept, so ``tfds.data_source('imagenet2012',
  data_dir=data_dir)`` and ``config.data.name='imagenet2012'`` read it like the real thing.
  """
  import tensorflow_datasets as tfds

  # Looked up before registration is switched off: the lookup imports tfds' dataset modules,
  # and modules first imported inside skip_registration() stay unregistered for the process.
  version = tfds.builder_cls("imagenet2012").VERSION
  with tfds.core.registered.skip_registration():
    class SmallImagenet(tfds.core.GeneratorBasedBuilder):
      name = "imagenet2012"
      VERSION = version
      code_path = None  # no checksums or metadata files next to this module

      def _info(self):  # the real one's features, with the 1000 classes unnamed
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=1000),
            "file_name": tfds.features.Text()}), supervised_keys=("image", "label"))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(examples) for split, examples in splits.items()}

      def _generate_examples(self, examples):  # pylint: disable=arguments-differ
        for index, (jpeg, label) in enumerate(examples):
          yield index, {"image": io.BytesIO(jpeg), "label": int(label),
                        "file_name": f"{index:08d}.JPEG"}

  builder = SmallImagenet(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return str(builder.data_dir)


# The straightforward preprocessing (the library's before it was made fast): decode the whole
# image, crop it, resize each colour channel separately.

def reference_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if image.shape[:2] == tuple(size):
    return image
  from PIL import Image
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize(
      (size[1], size[0]), Image.BILINEAR)) for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1)


def _decoded(image) -> np.ndarray:
  if isinstance(image, bytes):
    return decode_all([image])[0]
  return image if image.ndim == 3 else image[..., None]


@dataclasses.dataclass(frozen=True)
class ReferenceTrainTransform:
  """Inception training crop: full decode, crop, per-channel resize, flip."""
  size: tuple[int, int]

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    from aa_flax.data.preprocess import inception_crop_box
    image = _decoded(record["image"])
    top, left, height, width = inception_crop_box(image.shape[0], image.shape[1], rng)
    image = reference_resize(image[top:top + height, left:left + width], self.size)
    if rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}


@dataclasses.dataclass(frozen=True)
class ReferenceEvalTransform:
  """Central 87.5% square: full decode, crop, per-channel resize."""
  size: tuple[int, int]

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    image = _decoded(record["image"])
    side = max(1, int(round(0.875 * min(image.shape[0], image.shape[1]))))
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    image = reference_resize(image[top:top + side, left:left + side], self.size)
    return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}
