"""Random-access data sources: every split is a sequence of ``{'image', 'label'}`` records.

A record's ``image`` is ``uint8 [H, W, C]`` and its ``label`` an integer in
``[0, num_classes)``. Sources (``config.data.name``):

* ``digits``: the 1,797 8x8 handwritten digits bundled with scikit-learn, pixel values 0..16
  scaled to 0..255, split 80/20 stratified with a fixed seed (1,437 train / 360 test).
* ``npz``: ``images`` (uint8 NHWC) and ``labels`` (integer [N]) arrays from ``.npz`` files.
* ``synthetic``: random images and labels of any shape, generated per index (no memory).
* ``cifar10``, ``cifar100``, ``imagenet2012``: tensorflow-datasets ``data_source`` (ArrayRecord
  files read without TensorFlow; preparing them needs TensorFlow once).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import logging
import os
import zipfile
import zlib
from typing import Any, Sequence

import numpy as np

from aa_flax.errors import ConfigError, DataError, DatasetNotFoundError

DATASETS = ("digits", "npz", "synthetic", "cifar10", "cifar100", "imagenet2012")
TFDS_DATASETS = {
    # name: (train split, eval split, per-channel mean, per-channel std) on a 0..1 scale.
    "cifar10": ("train", "test", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("train", "test", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ("train", "validation", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Datasets whose records keep the JPEG file: preprocessing decodes it, at reduced size when
# the crop allows (see ``preprocess.crop_and_resize``).
TFDS_ENCODED_IMAGES = ("imagenet2012",)


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """In-memory source over ``images`` uint8 [N, H, W, C] and ``labels`` int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Deterministic random records generated from ``(seed, index)``; no memory held."""
  size: int
  image_shape: tuple[int, int, int]
  num_classes: int
  seed: int

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([self.seed, int(index)])
    image = rng.integers(0, 256, self.image_shape, dtype=np.uint8)
    return {"image": image, "label": np.int32(rng.integers(self.num_classes))}


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """Keeps only ``image`` and ``label`` of a ``tfds.data_source`` record; ``image`` is
  ``uint8 [H, W, C]``, or the encoded file (``bytes``) when tfds was told not to decode it."""
  source: Sequence[dict[str, Any]]

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    image = record["image"]
    if not isinstance(image, bytes):
      image = np.asarray(image)
    return {"image": image, "label": np.int32(record["label"])}


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
  """Train and eval sources plus what the model and the preprocessing need to know.

  ``image_shape`` is the stored ``(H, W, C)``; ``H`` and ``W`` are ``None`` when images vary
  in size (ImageNet). ``mean`` and ``std`` are per channel on a 0..1 pixel scale.
  ``fingerprint`` identifies the contents of npz files (``npz_fingerprint``); empty for
  sources fixed by their name and version.
  """
  name: str
  train: Sequence[dict[str, Any]]
  eval: Sequence[dict[str, Any]]
  num_classes: int
  image_shape: tuple[int | None, int | None, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  fingerprint: str = ""


def load_splits(data_config, *, seed: int) -> DatasetSplits:
  """Opens the train and eval splits named by ``data_config.name``.

  Raises ``ConfigError`` for an unknown name, ``DataError`` for malformed arrays and
  ``DatasetNotFoundError`` for a tfds dataset that is not prepared.
  """
  name = data_config.name
  if name == "digits":
    train, evaluation = _digits_arrays()
  elif name == "npz":
    train = load_npz_files(data_config.train_files, "config.data.train_files")
    evaluation = load_npz_files(data_config.eval_files, "config.data.eval_files")
  elif name == "synthetic":
    return _synthetic_splits(data_config, seed)
  elif name in TFDS_DATASETS:
    return _tfds_splits(data_config)
  else:
    raise ConfigError(f"Unknown dataset config.data.name={name!r}; valid names: "
                      f"{', '.join(DATASETS)}.")
  train_shape, eval_shape = train.images.shape[1:], evaluation.images.shape[1:]
  if train_shape[-1] != eval_shape[-1] or (not data_config.image_size
                                           and train_shape != eval_shape):
    raise DataError(f"Train images have shape {train_shape} (H, W, C) but eval images have "
                    f"{eval_shape}; channels must agree, and H, W too unless "
                    "config.data.image_size resizes both.")
  num_classes = data_config.num_classes or int(max(train.labels.max(), evaluation.labels.max())) + 1
  for split, arrays in (("train", train), ("eval", evaluation)):
    _check_labels(arrays.labels, num_classes, f"{name} {split} split")
  mean, std = _normalisation(data_config, train.images)
  fingerprint = ""
  if name == "npz":
    fingerprint = npz_fingerprint([data_config.train_files, data_config.eval_files])
  return DatasetSplits(name=name, train=train, eval=evaluation, num_classes=num_classes,
                       image_shape=tuple(train.images.shape[1:]), mean=mean, std=std,
                       fingerprint=fingerprint)


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _digits_arrays() -> tuple[ArraySource, ArraySource]:
  """The digits as uint8 ``[N, 8, 8, 1]`` images (0..16 scaled to 0..255), split 80/20."""
  pixels, labels = _read_digits()
  images = np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
  train, test = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
  return ArraySource(images[train], labels[train]), ArraySource(images[test], labels[test])


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
  """Pixels ``float [1797, 64]`` and labels ``int32 [1797]`` of scikit-learn's digits.

  The file that scikit-learn ships is read directly: importing scikit-learn (and scipy with it)
  takes seconds, longer than the rest of a small run's start-up. Should the file ever move,
  scikit-learn's own loader gives the same arrays.
  """
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("config.data.name='digits' needs scikit-learn, which ships these digits: "
                    "pip install scikit-learn.")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
  if os.path.exists(path):
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int32)
  from sklearn.datasets import load_digits
  pixels, labels = load_digits(return_X_y=True)
  return pixels, labels.astype(np.int32)


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Train and test indices (each shuffled) holding every class in the same proportion.

  The test split has ``ceil(test_fraction * N)`` examples; class ``c`` gets its share
  ``count_c * test_fraction`` rounded down, and the examples left over go to the classes with
  the largest remainders (the smaller class index first on ties). Which examples of a class
  are held out is a permutation seeded by ``seed``.
  """
  labels = np.asarray(labels)
  num_test = int(np.ceil(test_fraction * len(labels)))
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * (num_test / len(labels))
  shares = np.floor(exact).astype(int)
  by_remainder = np.argsort(-(exact - shares), kind="stable")
  shares[by_remainder[:num_test - shares.sum()]] += 1
  rng = np.random.default_rng(seed)
  held_out = [rng.permutation(np.flatnonzero(labels == c))[:share]
              for c, share in zip(classes, shares)]
  test = np.concatenate(held_out)
  train = np.setdiff1d(np.arange(len(labels)), test)
  return rng.permutation(train), rng.permutation(test)


def _expand_file_patterns(spec: str, field: str) -> list[str]:
  patterns = [p.strip() for p in spec.split(",") if p.strip()]
  if not patterns:
    raise ConfigError(f"{field} is empty; with config.data.name='npz' give a comma-separated "
                      "list of .npz paths or globs.")
  paths = []
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
      raise DataError(f"{field}: no file matches {pattern!r}.")
    paths.extend(matches)
  return paths


def npz_fingerprint(specs: Sequence[str]) -> str:
  """A short hash of the contents of the npz files ``specs`` name (comma-separated paths or
  globs each), from the CRC-32 and size of every array that the zip directory of each file
  records: cheap (no array is read) and different whenever the contents differ."""
  entries = []
  for spec in specs:
    for path in _expand_file_patterns(spec, "files"):
      with zipfile.ZipFile(path) as archive:
        entries.append([(info.filename, info.CRC, info.file_size)
                        for info in archive.infolist()])
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _check_is_npz(path: str) -> None:
  """Raises ``DataError`` unless ``path`` starts like a zip archive (what ``np.savez``
  writes); a damaged archive is left for ``np.load`` to report."""
  try:
    with open(path, "rb") as handle:
      head = handle.read(16)
  except OSError as error:
    raise DataError(f"{path} cannot be read ({error}).") from error
  if head.startswith(b"PK"):
    return
  if not head:
    kind = "the file is empty"
  elif head.startswith(b"\x93NUMPY"):
    kind = "it is a single .npy array, not an archive of arrays"
  else:
    kind = f"it is not a zip archive (it starts with {head!r})"
  raise DataError(f"{path} cannot be read as an .npz archive: {kind}. Write one with "
                  "np.savez(path, images=images, labels=labels).")


# What a damaged or foreign archive raises from np.load: a bad zip directory, a truncated or
# corrupt member, a member that is not an .npy array (or a pickled object, refused).
_NPZ_READ_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError)


def load_npz_files(spec: str, field: str = "files") -> ArraySource:
  """Loads and concatenates ``images``/``labels`` from comma-separated ``.npz`` paths or globs.

  Every file must hold ``images`` uint8 [N, H, W, C] with N >= 1 and ``labels`` integer [N];
  all files must share ``(H, W, C)``. Raises ``DataError`` naming the file and the problem.
  """
  images, labels = [], []
  for path in _expand_file_patterns(spec, field):
    _check_is_npz(path)
    try:
      with np.load(path, allow_pickle=False) as archive:
        found = archive.files
        arrays = {key: archive[key] for key in ("images", "labels") if key in found}
    except _NPZ_READ_ERRORS as error:
      raise DataError(f"{path}: cannot be read as an .npz archive "
                      f"({type(error).__name__}: {error}).") from error
    missing = {"images", "labels"} - set(arrays)
    if missing:
      raise DataError(f"{path}: missing array(s) {sorted(missing)}; an npz source needs "
                      f"'images' (uint8 NHWC) and 'labels' (int); found {found}.")
    file_images, file_labels = arrays["images"], arrays["labels"]
    validate_arrays(file_images, file_labels, path)
    if images and file_images.shape[1:] != images[0].shape[1:]:
      raise DataError(f"{path}: images have shape {file_images.shape[1:]} (H, W, C) but earlier "
                      f"files have {images[0].shape[1:]}; all files of a split must agree.")
    images.append(file_images)
    labels.append(file_labels.astype(np.int32))
  return ArraySource(np.concatenate(images), np.concatenate(labels))


def validate_arrays(images: np.ndarray, labels: np.ndarray, where: str) -> None:
  """Checks ``images`` uint8 [N, H, W, C] (N, H, W, C >= 1) and ``labels`` integer [N] in
  [0, 2**31 - 1] (they are stored as int32)."""
  if images.dtype != np.uint8:
    raise DataError(f"{where}: images have dtype {images.dtype}; expected uint8 (0..255). "
                    "Convert with np.clip(x * 255, 0, 255).astype(np.uint8) if they are 0..1 "
                    "floats.")
  if images.ndim != 4:
    hint = " (add a channel axis with images[..., None])" if images.ndim == 3 else ""
    raise DataError(f"{where}: images have shape {images.shape} (rank {images.ndim}); expected "
                    f"rank 4 [N, H, W, C]{hint}.")
  if min(images.shape) < 1:
    raise DataError(f"{where}: images have shape {images.shape}; no dimension may be empty.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{where}: labels have dtype {labels.dtype}; expected an integer dtype.")
  if labels.shape != (images.shape[0],):
    raise DataError(f"{where}: labels have shape {labels.shape}; expected ({images.shape[0]},) "
                    "to match the images.")
  if labels.min() < 0:
    raise DataError(f"{where}: label {int(labels.min())} is negative; labels must be in "
                    "[0, num_classes).")
  limit = np.iinfo(np.int32).max  # labels are stored as int32
  if int(labels.max()) > limit:
    raise DataError(f"{where}: label {int(labels.max())} does not fit int32 (at most {limit}); "
                    "labels must be in [0, num_classes).")


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  if labels.max() >= num_classes:
    raise DataError(f"{where}: label {int(labels.max())} is out of range for num_classes="
                    f"{num_classes} (valid labels 0..{num_classes - 1}).")


def _normalisation(data_config, train_images: np.ndarray) -> tuple[tuple[float, ...], ...]:
  """Per-channel mean/std on a 0..1 scale: from the config if set, else from the train images."""
  channels = train_images.shape[-1]
  if data_config.mean and data_config.std:
    mean, std = tuple(data_config.mean), tuple(data_config.std)
    if len(mean) != channels or len(std) != channels:
      raise ConfigError(f"config.data.mean={mean} / std={std} must have one value per channel "
                        f"({channels}).")
    return mean, std
  flat = train_images.reshape(-1, channels).astype(np.float64) / 255.0
  return tuple(flat.mean(0).tolist()), tuple(np.maximum(flat.std(0), 1e-3).tolist())


def _synthetic_splits(data_config, seed: int) -> DatasetSplits:
  size = data_config.image_size or 32
  shape = (size, size, data_config.synthetic.channels)
  num_classes = data_config.num_classes or data_config.synthetic.num_classes
  channels = shape[-1]
  return DatasetSplits(
      name="synthetic",
      train=SyntheticSource(data_config.synthetic.num_train_examples, shape, num_classes, seed),
      eval=SyntheticSource(data_config.synthetic.num_eval_examples, shape, num_classes, seed + 1),
      num_classes=num_classes, image_shape=shape, mean=(0.5,) * channels, std=(0.29,) * channels)


def prepare_instructions(name: str, data_dir: str) -> str:
  """The steps that put a tfds dataset into ``data_dir`` in the ArrayRecord format."""
  manual = ""
  if name == "imagenet2012":
    manual = ("  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
              "https://image-net.org (needs an account) into\n"
              f"     {os.path.join(data_dir, 'downloads', 'manual')}/\n")
  step = "2" if manual else "1"
  return (f"{manual}  {step}. Prepare it once (this step alone needs TensorFlow):\n"
          "     pip install tensorflow tensorflow-datasets\n"
          f"     tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
          f"  Then train with --config.data.tfds_data_dir={data_dir}.")


# What tfds raises for data it cannot open: no prepared version (NotImplementedError: it falls
# back to a TFRecord reader without random access), TFRecord files only (the same), a
# dataset_info.json of another version (AssertionError), unreadable or missing files
# (OSError), an unknown name or split (ValueError).
_TFDS_OPEN_ERRORS = (NotImplementedError, AssertionError, OSError, ValueError)


def _tfds_splits(data_config) -> DatasetSplits:
  import tensorflow_datasets as tfds
  name = data_config.name
  train_split, eval_split, mean, std = TFDS_DATASETS[name]
  data_dir = data_config.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # tfds warns about the folders it probes
  decoders = {"image": tfds.decode.SkipDecoding()} if name in TFDS_ENCODED_IMAGES else None
  try:
    sources = tfds.data_source(name, split=[train_split, eval_split], data_dir=data_dir,
                               download=False, decoders=decoders)
    info = tfds.builder(name, data_dir=data_dir).info
  except _TFDS_OPEN_ERRORS as error:
    raise DatasetNotFoundError(f"{_why_not_prepared(name, data_dir, error)}\n"
                               + prepare_instructions(name, data_dir)) from error
  finally:
    absl_logger.setLevel(level)
  num_classes = info.features["label"].num_classes
  channels = 3
  return DatasetSplits(name=name, train=TfdsSource(sources[0]), eval=TfdsSource(sources[1]),
                       num_classes=data_config.num_classes or num_classes,
                       image_shape=(None, None, channels),
                       mean=tuple(data_config.mean) or mean, std=tuple(data_config.std) or std)


def _why_not_prepared(name: str, data_dir: str, error: Exception) -> str:
  """One sentence on why tfds could not open ``name`` in ``data_dir`` (looks at the files)."""
  root = os.path.join(data_dir, name)
  infos = glob.glob(os.path.join(root, "*", "dataset_info.json")) + glob.glob(
      os.path.join(root, "*", "*", "dataset_info.json"))
  if not infos:
    return f"Dataset {name!r} is not prepared: {root} holds no prepared version."
  version_dir = os.path.dirname(sorted(infos)[-1])
  if not glob.glob(os.path.join(version_dir, "*.array_record*")):
    return (f"Dataset {name!r} in {version_dir} is prepared in the TFRecord format only; "
            "training reads the ArrayRecord format (no TensorFlow needed).")
  detail = " ".join(str(error).split())
  return (f"Dataset {name!r} in {version_dir} could not be opened "
          f"({type(error).__name__}: {detail}).")
