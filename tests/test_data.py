"""Data sources, preprocessing and grain pipelines (no training)."""

import collections
import logging
import os
import subprocess
import sys
import time
import types

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds

from aa_flax import parallel
from aa_flax.config_utils import base_config
from aa_flax.data import InputPipeline, load_npz_files, load_splits, resolve_num_workers
from aa_flax.data import preprocess
from aa_flax.data.sources import ArraySource, DatasetSplits, stratified_split
from aa_flax.errors import ConfigError, DataError, DatasetNotFoundError
from benchmarks import input_data
from train_helpers import REPO_ROOT, SHARED_DATA


def _data_config(**kwargs) -> ml_collections.ConfigDict:
  config = base_config().data
  for key, value in kwargs.items():
    config[key] = value
  return config


def _splits(num_train: int, num_eval: int, shape=(6, 5, 2), num_classes=None) -> DatasetSplits:
  """Labels are the example index, so a batch tells exactly which examples it holds."""
  def arrays(n, offset):
    images = (np.arange(n * np.prod(shape)) % 251).astype(np.uint8).reshape(n, *shape)
    return ArraySource(images, np.arange(offset, offset + n, dtype=np.int32))
  return DatasetSplits(name="test", train=arrays(num_train, 0), eval=arrays(num_eval, 0),
                       num_classes=num_classes or max(num_train, num_eval),
                       image_shape=shape, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])


def _write_npz(path, images, labels):
  np.savez(path, images=images, labels=labels)
  return str(path)


def test_digits_split_is_fixed_and_stratified():
  splits = load_splits(_data_config(name="digits"), seed=0)
  assert (len(splits.train), len(splits.eval)) == (1437, 360)
  assert splits.num_classes == 10 and splits.image_shape == (8, 8, 1)
  eval_counts = collections.Counter(splits.eval.labels.tolist())
  assert min(eval_counts.values()) >= 35 and max(eval_counts.values()) <= 37  # stratified
  assert splits.train.images.dtype == np.uint8 and splits.train.images.max() == 255
  again = load_splits(_data_config(name="digits"), seed=123)  # the split ignores the seed
  np.testing.assert_array_equal(again.eval.labels, splits.eval.labels)
  # The same 1,797 digits scikit-learn's loader gives, each in exactly one split.
  pixels, labels = load_digits(return_X_y=True)
  expected = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
  ours = np.concatenate([splits.train.images, splits.eval.images]).reshape(len(labels), 64)
  ours_labels = np.concatenate([splits.train.labels, splits.eval.labels])
  def as_rows(images, image_labels):
    return sorted(zip(image_labels.tolist(), map(bytes, images)))
  assert as_rows(ours, ours_labels) == as_rows(expected, labels)


@pytest.mark.parametrize("fraction", [0.2, 0.37])
def test_stratified_split_holds_out_each_class_in_proportion(fraction):
  labels = np.random.default_rng(0).choice(5, size=203, p=[0.4, 0.3, 0.15, 0.1, 0.05])
  train, test = stratified_split(labels, fraction, seed=7)
  assert len(test) == int(np.ceil(fraction * len(labels)))
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
  for c in range(5):
    count = (labels == c).sum()
    assert abs((labels[test] == c).sum() - count * fraction) < 1  # floor or ceil of its share
  again_train, again_test = stratified_split(labels, fraction, seed=7)
  np.testing.assert_array_equal(again_test, test)
  np.testing.assert_array_equal(again_train, train)
  assert not np.array_equal(stratified_split(labels, fraction, seed=8)[1], test)


def test_npz_concatenates_globs_and_infers_classes(tmp_path):
  rng = np.random.default_rng(0)
  for part in range(2):
    _write_npz(tmp_path / f"train_{part}.npz", rng.integers(0, 256, (5, 7, 9, 3), np.uint8),
               np.array([0, 1, 2, 3, 6 * part], np.int64))
  _write_npz(tmp_path / "eval.npz", rng.integers(0, 256, (4, 7, 9, 3), np.uint8),
             np.array([0, 1, 2, 3]))
  config = _data_config(name="npz", train_files=f"{tmp_path}/train_*.npz",
                        eval_files=str(tmp_path / "eval.npz"))
  splits = load_splits(config, seed=0)
  assert len(splits.train) == 10 and len(splits.eval) == 4
  assert splits.num_classes == 7 and splits.image_shape == (7, 9, 3)
  assert splits.train.labels.dtype == np.int32
  flat = splits.train.images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(splits.mean, flat.mean(0), rtol=1e-6)
  config.num_classes = 6
  with pytest.raises(DataError, match="label 6 is out of range for num_classes=6"):
    load_splits(config, seed=0)


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int32), "dtype float32; expected uint8"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.int32), r"rank 3.*images\[..., None\]"),
    (np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int32), "no dimension may be empty"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(3, np.int32), r"labels have shape \(3,\)"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.float32), "labels have dtype float32"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, -1, 2]), "label -1 is negative"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2**32, 2]),
     r"label 4294967296 does not fit int32 \(at most 2147483647\)"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2**63, 2], np.uint64),
     r"label 9223372036854775808 does not fit int32"),
])
def test_npz_malformed_arrays_raise_clear_errors(tmp_path, images, labels, message):
  path = _write_npz(tmp_path / "bad.npz", images, labels)
  with pytest.raises(DataError, match=message) as error:
    load_npz_files(path)
  assert "bad.npz" in str(error.value)


def test_npz_missing_keys_unreadable_and_unmatched_files(tmp_path):
  np.savez(tmp_path / "keys.npz", x=np.zeros((2, 4, 4, 1), np.uint8))
  with pytest.raises(DataError, match=r"missing array\(s\) \['images', 'labels'\]"):
    load_npz_files(str(tmp_path / "keys.npz"))
  (tmp_path / "empty.npz").write_bytes(b"")
  with pytest.raises(DataError, match="cannot be read as an .npz archive"):
    load_npz_files(str(tmp_path / "empty.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
  with pytest.raises(DataError, match="cannot be read"):
    load_npz_files(str(tmp_path / "junk.npz"))
  with pytest.raises(DataError, match="no file matches"):
    load_npz_files(str(tmp_path / "nothing_*.npz"))
  with pytest.raises(ConfigError, match="is empty"):
    load_npz_files(" , ", "config.data.train_files")
  _write_npz(tmp_path / "a.npz", np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int32))
  _write_npz(tmp_path / "b.npz", np.zeros((2, 5, 4, 1), np.uint8), np.zeros(2, np.int32))
  with pytest.raises(DataError, match="all files of a split must agree"):
    load_npz_files(f"{tmp_path}/a.npz,{tmp_path}/b.npz")


def test_files_that_are_not_npz_archives_are_named_plainly(tmp_path):
  (tmp_path / "labels.npz").write_text("image,label\n0,1\n")
  with pytest.raises(DataError) as error:
    load_npz_files(str(tmp_path / "labels.npz"))
  message = str(error.value)
  assert "labels.npz cannot be read as an .npz archive: it is not a zip archive" in message
  assert "np.savez(path, images=images, labels=labels)" in message
  assert "pickle" not in message
  np.save(tmp_path / "images.npy", np.zeros((2, 4, 4, 1), np.uint8))
  with pytest.raises(DataError, match="it is a single .npy array, not an archive of arrays"):
    load_npz_files(str(tmp_path / "images.npy"))


def test_npz_fingerprint_changes_with_contents_behind_the_same_path(tmp_path):
  images = np.zeros((4, 4, 4, 1), np.uint8)
  path = _write_npz(tmp_path / "train.npz", images, np.array([0, 1, 2, 3]))
  config = _data_config(name="npz", train_files=path, eval_files=path)
  before = load_splits(config, seed=0).fingerprint
  assert len(before) == 16 and load_splits(config, seed=0).fingerprint == before
  _write_npz(tmp_path / "train.npz", images, np.array([0, 1, 3, 2]))  # two labels swapped
  assert load_splits(config, seed=0).fingerprint != before
  assert load_splits(_data_config(name="digits"), seed=0).fingerprint == ""


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ConfigError, match="Unknown dataset config.data.name='imagenet'.*digits"):
    load_splits(_data_config(name="imagenet"), seed=0)


def test_missing_imagenet_gives_instructions(tmp_path):
  config = _data_config(name="imagenet2012", tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DatasetNotFoundError) as error:
    load_splits(config, seed=0)
  message = str(error.value)
  assert "ILSVRC2012_img_train.tar" in message and "downloads/manual" in message
  assert "tfds build imagenet2012" in message and "--file_format=array_record" in message
  assert f"{tmp_path / 'tfds' / 'imagenet2012'} holds no prepared version" in message
  assert "Possible root causes" not in message
  assert not (tmp_path / "tfds").exists()  # nothing written


def test_tfrecord_only_dataset_is_named_as_such(tmp_path, caplog):
  """A dataset prepared in the TFRecord format only: said so, and tfds' warnings about the
  folders it probes stay out of the log."""
  version_dir = tmp_path / "tfds" / "cifar10" / "3.0.2"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text("{}")
  (version_dir / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
  config = _data_config(name="cifar10", tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DatasetNotFoundError, match="prepared in the TFRecord format only"):
    load_splits(config, seed=0)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_preprocess_shapes_and_determinism():
  rng_image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)
  for augment in preprocess.AUGMENTATIONS:
    train = preprocess.TrainTransform(augment, (24, 20))
    first = train({"image": rng_image, "label": 3}, np.random.default_rng(7))
    second = train({"image": rng_image, "label": 3}, np.random.default_rng(7))
    assert first["image"].shape == (24, 20, 3) and first["image"].dtype == np.uint8
    np.testing.assert_array_equal(first["image"], second["image"])
    evaluated = preprocess.EvalTransform(augment, (24, 20))({"image": rng_image, "label": 3})
    assert evaluated["image"].shape == (24, 20, 3) and evaluated["label"] == 3
  with pytest.raises(ConfigError, match="Unknown config.data.augment='cutout'.*inception"):
    preprocess.TrainTransform("cutout", (8, 8))


def test_cifar_crop_is_a_shifted_window_and_inception_box_is_valid():
  image = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8, 1)
  crop = preprocess.pad_random_crop(image, np.random.default_rng(3), (8, 8))
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  assert any(np.array_equal(crop, padded[t:t + 8, l:l + 8]) for t in range(9) for l in range(9))
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, height, width = preprocess.inception_crop_box(50, 80, rng)
    assert 0 <= top and top + height <= 50 and 0 <= left and left + width <= 80
    assert height * width >= 0.08 * 50 * 80 * 0.9


def test_train_stream_is_deterministic_and_process_shards_partition_it():
  splits = _splits(num_train=20, num_eval=4)
  single = InputPipeline(splits, global_batch_size=8, eval_global_batch_size=4,
                         image_size=(6, 5), augment="flip", seed=3)
  batches = [single.train_dataset()[b] for b in range(6)]  # 48 = 2.4 epochs
  stream = np.concatenate([b["label"] for b in batches])
  for epoch in range(2):
    assert sorted(stream[20 * epoch:20 * (epoch + 1)]) == list(range(20))
  assert not np.array_equal(stream[:20], stream[20:40])  # reshuffled each epoch
  shards = [InputPipeline(splits, global_batch_size=8, eval_global_batch_size=4,
                          image_size=(6, 5), augment="flip", seed=3, process_index=p,
                          process_count=2).train_dataset() for p in range(2)]
  for b in range(6):
    union = np.concatenate([shards[p][b]["label"] for p in range(2)])
    assert sorted(union) == sorted(batches[b]["label"])
    images = {int(l): im for p in range(2) for l, im in zip(shards[p][b]["label"],
                                                             shards[p][b]["image"])}
    for label, image in zip(batches[b]["label"], batches[b]["image"]):
      np.testing.assert_array_equal(images[int(label)], image)  # same flips on any layout


def test_train_stream_resumes_at_an_example_position_with_any_batch_size():
  """A run stopped after 5 batches of 4 resumes at example 20 with batches of 8 or 2 (or
  on 2 processes) and reads exactly the examples, with the same flips, that follow."""
  splits = _splits(num_train=13, num_eval=4)

  def pipeline(batch, **kwargs):
    return InputPipeline(splits, global_batch_size=batch, eval_global_batch_size=4,
                         image_size=(6, 5), augment="flip", seed=1, **kwargs)

  iterator = pipeline(4).train_iterator()
  stream = [next(iterator) for _ in range(9)]
  expected_labels = np.concatenate([b["label"] for b in stream[5:]])  # examples 20..35
  expected_images = np.concatenate([b["image"] for b in stream[5:]])
  for batch, count in ((8, 2), (2, 8)):
    resumed = pipeline(batch).train_iterator(start=20)
    got = [next(resumed) for _ in range(count)]
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in got]), expected_labels)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in got]), expected_images)
  shards = [pipeline(8, process_index=p, process_count=2).train_iterator(start=20)
            for p in range(2)]
  first = np.concatenate([next(shard)["label"] for shard in shards])
  assert sorted(first) == sorted(expected_labels[:8])


@pytest.mark.parametrize("num_eval, global_batch, processes", [
    (10, 4, 1), (10, 4, 2), (7, 8, 4), (3, 6, 3), (16, 8, 2), (1, 4, 2)])
def test_eval_counts_every_example_exactly_once(num_eval, global_batch, processes):
  splits = _splits(num_train=4, num_eval=num_eval)
  seen = []
  batch_counts = set()
  for process in range(processes):
    pipeline = InputPipeline(splits, global_batch_size=global_batch,
                             eval_global_batch_size=global_batch, image_size=(6, 5),
                             augment="none", seed=0, process_index=process,
                             process_count=processes)
    batches = list(pipeline.eval_batches())
    batch_counts.add(len(batches))
    for batch in batches:
      assert batch["image"].shape == (global_batch // processes, 6, 5, 2)
      seen.extend(batch["label"][batch["mask"] > 0].tolist())
  assert len(batch_counts) == 1  # every process runs the same number of eval steps
  assert sorted(seen) == list(range(num_eval))


def _tfds_pipeline(name, image_size, augment):
  config = _data_config(name=name, image_size=image_size, augment=augment)
  with tfds.testing.mock_data(num_examples=10):
    splits = load_splits(config, seed=0)
    pipeline = InputPipeline(splits, global_batch_size=4, eval_global_batch_size=4,
                             image_size=(image_size, image_size), augment=augment, seed=0)
    return splits, next(pipeline.train_iterator()), list(pipeline.eval_batches())


@pytest.mark.parametrize("name, size, augment, classes", [
    ("cifar10", 32, "cifar", 10), ("cifar100", 32, "cifar", 100)])
def test_tfds_pipelines_under_mock_data(name, size, augment, classes):
  splits, train_batch, eval_batches = _tfds_pipeline(name, size, augment)
  assert splits.num_classes == classes and len(splits.train) == 10
  assert train_batch["image"].shape == (4, size, size, 3)
  assert train_batch["image"].dtype == np.uint8 and train_batch["label"].dtype == np.int32
  assert len(eval_batches) == 3 and sum(b["mask"].sum() for b in eval_batches) == 10


@pytest.fixture(scope="module")
def small_imagenet(tmp_path_factory):
  """A prepared tfds ``imagenet2012`` (ArrayRecord) of real JPEG photos: 12 train examples
  labelled 0..11, 5 validation examples labelled 100..104."""
  jpegs = input_data.jpeg_images(17, sizes=((75, 100), (100, 67), (90, 120)))
  data_dir = tmp_path_factory.mktemp("tfds")
  input_data.write_tfds_imagenet(str(data_dir), {
      "train": [(jpeg, label) for label, jpeg in enumerate(jpegs[:12])],
      "validation": [(jpeg, 100 + label) for label, jpeg in enumerate(jpegs[12:])]})
  return str(data_dir)


def test_writing_the_small_imagenet_leaves_other_tfds_datasets_registered(tmp_path):
  """In a fresh process (tfds' dataset modules not yet imported), writing the test dataset
  must not hide the real builders from ``tfds.builder`` afterwards."""
  script = (
      "import sys\n"
      "from benchmarks import input_data\n"
      "jpeg = input_data.jpeg_images(1, sizes=((20, 24),))[0]\n"
      f"input_data.write_tfds_imagenet({str(tmp_path)!r}, {{'train': [(jpeg, 0)]}})\n"
      "import tensorflow_datasets as tfds\n"
      "print(tfds.builder_cls('cifar10').name, tfds.builder_cls('imagenet2012').name)\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[-2:] == ["cifar10", "imagenet2012"]


def test_tfds_imagenet_reads_jpeg_files_and_decodes_in_preprocessing(small_imagenet):
  config = _data_config(name="imagenet2012", tfds_data_dir=small_imagenet, image_size=24,
                        augment="inception")
  splits = load_splits(config, seed=0)
  assert (len(splits.train), len(splits.eval), splits.num_classes) == (12, 5, 1000)
  assert isinstance(splits.train[0]["image"], bytes)  # decoded later, at reduced size
  pipeline = InputPipeline(splits, global_batch_size=4, eval_global_batch_size=4,
                           image_size=(24, 24), augment="inception", seed=0)
  with pipeline.train_iterator() as iterator:
    batch = next(iterator)
  assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
  eval_batches = list(pipeline.eval_batches())
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in eval_batches])
  assert sorted(labels.tolist()) == list(range(100, 105))


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_shared_npz_files_load_and_mismatched_sizes_are_refused():
  mixed = _data_config(name="npz", train_files=str(SHARED_DATA / "cifar10_test.npz"),
                       eval_files=str(SHARED_DATA / "imagenette_64px_val_subset.npz"))
  with pytest.raises(DataError, match="unless config.data.image_size"):  # 32x32 vs 64x64
    load_splits(mixed, seed=0)
  mixed.image_size = 32
  assert load_splits(mixed, seed=0).image_shape == (32, 32, 3)
  splits = load_splits(_data_config(name="npz",
                                    train_files=str(SHARED_DATA / "cifar10_test.npz"),
                                    eval_files=str(SHARED_DATA / "cifar10_test.npz")), seed=0)
  assert (len(splits.train), splits.num_classes, splits.image_shape) == (10_000, 10, (32, 32, 3))
  np.testing.assert_allclose(splits.mean, (0.4913, 0.4821, 0.4465), atol=5e-3)


def test_synthetic_source_is_deterministic_and_sized_by_config():
  config = _data_config(name="synthetic", image_size=12, num_classes=5)
  config.synthetic.num_train_examples, config.synthetic.channels = 40, 2
  splits = load_splits(config, seed=7)
  assert len(splits.train) == 40 and splits.image_shape == (12, 12, 2)
  assert splits.num_classes == 5
  first, again = splits.train[3], load_splits(config, seed=7).train[3]
  np.testing.assert_array_equal(first["image"], again["image"])
  assert first["image"].dtype == np.uint8 and 0 <= first["label"] < 5
  assert not np.array_equal(first["image"], load_splits(config, seed=8).train[3]["image"])


def _imagenet_pipeline(data_dir, num_workers, **kwargs):
  config = _data_config(name="imagenet2012", tfds_data_dir=data_dir, image_size=16,
                        augment="inception")
  options = dict(global_batch_size=3, eval_global_batch_size=4, image_size=(16, 16),
                 augment="inception", seed=5, num_threads=2, num_workers=num_workers)
  return InputPipeline(load_splits(config, seed=0), **{**options, **kwargs})


def test_worker_processes_make_the_same_batches_and_resume_exactly(small_imagenet):
  """Batches from 2 worker processes equal the in-process ones; a resume from the position
  after 2 batches (6 examples) without workers reads the same next batches (5 batches = 15
  examples, into epoch 2)."""
  with _imagenet_pipeline(small_imagenet, 0).train_iterator() as threads:
    want = [next(threads) for _ in range(5)]
  with _imagenet_pipeline(small_imagenet, 2).train_iterator() as workers:
    got = [next(workers), next(workers)]
  with _imagenet_pipeline(small_imagenet, 0).train_iterator(start=6) as resumed:
    got += [next(resumed) for _ in range(3)]
  for batch, expected in zip(got, want):
    np.testing.assert_array_equal(batch["label"], expected["label"])
    np.testing.assert_array_equal(batch["image"], expected["image"])


def test_eval_with_worker_processes_counts_every_example_once(small_imagenet):
  """Process 0 of 2 reads with 2 worker processes, process 1 in-process threads."""
  seen = []
  for process, workers in ((0, 2), (1, 0)):
    pipeline = _imagenet_pipeline(small_imagenet, workers, process_index=process,
                                  process_count=2)
    for batch in pipeline.eval_batches():
      assert batch["image"].shape == (2, 16, 16, 3)
      seen.extend(batch["label"][batch["mask"] > 0].tolist())
  assert sorted(seen) == list(range(100, 105))


def test_automatic_worker_count():
  cores = len(os.sched_getaffinity(0))
  assert resolve_num_workers(3, "digits") == 3 and resolve_num_workers(0, "imagenet2012") == 0
  assert resolve_num_workers(-1, "digits") == 0 and resolve_num_workers(-1, "npz") == 0
  assert resolve_num_workers(-1, "imagenet2012") == (min(cores, 32) if cores > 1 else 0)
  with pytest.raises(ConfigError, match="num_workers=-2 is invalid"):
    resolve_num_workers(-2, "digits")


def test_worker_processes_from_a_script_read_from_stdin_are_refused(monkeypatch):
  main = types.ModuleType("__main__")
  main.__file__ = "/nonexistent/<stdin>"
  monkeypatch.setitem(sys.modules, "__main__", main)
  with pytest.raises(ConfigError, match=r"num_workers=2: .*not a file.*set it to 0"):
    InputPipeline(_splits(4, 4), global_batch_size=2, eval_global_batch_size=2,
                  image_size=(6, 5), augment="none", seed=0, num_workers=2)
  assert resolve_num_workers(-1, "imagenet2012") == 0


class _SlowBatches:
  """Host batches ``{'image': [8, 2] = b, 'label': [8] = b}`` for b = 0, 1, ..., each after
  ``delay`` seconds; raises ``ValueError`` at ``fail_at``."""

  def __init__(self, delay=0.0, fail_at=None):
    self.next_index, self.delay, self.fail_at = 0, delay, fail_at

  def __next__(self):
    time.sleep(self.delay)
    if self.next_index == self.fail_at:
      raise ValueError("broken record")
    b = self.next_index
    self.next_index += 1
    return {"image": np.full((8, 2), b, np.uint8), "label": np.full((8,), b, np.int32)}


def test_device_batches_are_global_in_order_and_read_ahead():
  mesh = parallel.create_mesh()
  host = _SlowBatches()
  with parallel.DeviceBatches(host, mesh, ahead=3) as batches:
    for b in range(4):
      batch = next(batches)
      assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (8, 2)
      assert batch["label"].sharding.is_equivalent_to(parallel.batch_sharded(mesh), 1)
      np.testing.assert_array_equal(np.asarray(batch["label"]), np.full(8, b))
    time.sleep(0.2)
    assert host.next_index > 4  # read ahead of the batches taken


def test_device_batches_count_waiting_and_raise_host_errors():
  mesh = parallel.create_mesh()
  with parallel.DeviceBatches(_SlowBatches(delay=0.05, fail_at=3), mesh) as batches:
    for _ in range(3):
      next(batches)
    assert batches.wait_seconds >= 0.1
    with pytest.raises(ValueError, match="broken record"):
      next(batches)
    with pytest.raises(ValueError, match="broken record"):
      next(batches)


def test_a_bug_while_reading_npz_files_keeps_its_own_error(tmp_path, monkeypatch):
  """Only what a damaged archive raises becomes a DataError; anything else (a bug) surfaces."""
  path = _write_npz(tmp_path / "a.npz", np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int32))

  def broken_load(*args, **kwargs):
    raise TypeError("a bug in the reader")

  monkeypatch.setattr(np, "load", broken_load)
  with pytest.raises(TypeError, match="a bug in the reader"):
    load_npz_files(path)


def test_a_bug_while_opening_a_tfds_dataset_keeps_its_own_error(tmp_path, monkeypatch):
  def broken_data_source(*args, **kwargs):
    raise TypeError("a bug in the opener")

  monkeypatch.setattr(tfds, "data_source", broken_data_source)
  config = _data_config(name="cifar10", tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(TypeError, match="a bug in the opener"):
    load_splits(config, seed=0)
