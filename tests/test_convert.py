"""``python -m aa_flax.data.convert``: CIFAR python batches and image folders to npz files."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from aa_flax.data import convert, load_npz_files
from aa_flax.errors import DataError
from train_helpers import REPO_ROOT, subprocess_env


def _write_cifar_batch(path, images, labels, label_key):
  rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)  # R, G, B planes
  with open(path, "wb") as handle:
    pickle.dump({b"data": rows, label_key: list(labels)}, handle)


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_python_batches_round_trip(tmp_path, variant):
  rng = np.random.default_rng(0)
  source = tmp_path / variant
  source.mkdir()
  train_names, test_names, label_key, meta_name, names_key = convert._CIFAR_LAYOUTS[variant]
  expected = {}
  for split, names in (("train", train_names), ("test", test_names)):
    images = rng.integers(0, 256, (3 * len(names), 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, len(images)).astype(np.int32)
    for i, name in enumerate(names):
      _write_cifar_batch(source / name, images[3 * i:3 * i + 3], labels[3 * i:3 * i + 3],
                         label_key)
    expected[split] = (images, labels)
  with open(source / meta_name, "wb") as handle:
    pickle.dump({names_key: [f"class{k}".encode() for k in range(10)]}, handle)

  out = tmp_path / "npz"
  subprocess.run([sys.executable, "-m", "aa_flax.data.convert", "cifar", str(source), str(out)],
                 env=subprocess_env(), cwd=REPO_ROOT, check=True, capture_output=True)
  for split, (images, labels) in expected.items():
    loaded = load_npz_files(str(out / f"{split}.npz"))
    np.testing.assert_array_equal(loaded.images, images)  # pixel (y, x, channel) preserved
    np.testing.assert_array_equal(loaded.labels, labels)
    with np.load(out / f"{split}.npz") as archive:
      assert list(archive["class_names"]) == [f"class{k}" for k in range(10)]


def test_image_folder_with_resize_and_size_mismatch(tmp_path):
  root = tmp_path / "images"
  colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
  for name, colour in colours.items():
    (root / name).mkdir(parents=True)
    for i, size in enumerate(((20, 10), (12, 12))):
      Image.new("RGB", size, colour).save(root / name / f"{i}.png")
  (root / "dog" / "notes.txt").write_text("not an image")

  with pytest.raises(DataError, match=r"1.png is 12x12 but earlier images are 20x10; pass "
                                      r"--size"):
    convert.read_image_folder(str(root))
  arrays = convert.read_image_folder(str(root), size=8)
  assert arrays["images"].shape == (4, 8, 8, 3) and arrays["images"].dtype == np.uint8
  np.testing.assert_array_equal(arrays["labels"], [0, 0, 1, 1])
  assert list(arrays["class_names"]) == ["cat", "dog"]
  np.testing.assert_array_equal(arrays["images"][0, 4, 4], colours["cat"])
  np.testing.assert_array_equal(arrays["images"][3, 4, 4], colours["dog"])


def test_bad_sources_are_named(tmp_path):
  with pytest.raises(DataError, match="neither a CIFAR-10"):
    convert.read_cifar_python(str(tmp_path))
  with pytest.raises(DataError, match="no class sub-folders"):
    convert.read_image_folder(str(tmp_path))
  with pytest.raises(DataError, match="is not a directory"):
    convert.read_image_folder(str(tmp_path / "missing"))
