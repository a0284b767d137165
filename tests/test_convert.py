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


def _convert(*args, cwd=REPO_ROOT):
  return subprocess.run([sys.executable, "-m", "aa_flax.data.convert", *map(str, args)],
                        env=subprocess_env(), cwd=cwd, capture_output=True, text=True,
                        timeout=120)


def test_bad_arguments_print_one_line_and_write_nothing(tmp_path):
  root = tmp_path / "images"
  (root / "cat").mkdir(parents=True)
  Image.new("RGB", (4, 4)).save(root / "cat" / "0.png")
  a_file = tmp_path / "a_file"
  a_file.write_text("not a folder")
  out = tmp_path / "out"
  for args, expected in [
      (["--size=0"], "--size=0 is invalid; give a side length from 1 to 4096"),
      (["--size=-5"], "--size=-5 is invalid"),
      (["--size=1000000"], "--size=1000000 is invalid"),
      (["--name=../escaped"], "--name='../escaped' must be a plain file name"),
      (["--name=sub/train"], "--name='sub/train' must be a plain file name"),
      (["--name="], "--name='' must be a plain file name"),
  ]:
    run = _convert("folder", root, out, *args)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode != 0 and len(lines) == 1 and expected in lines[0], run.stderr
    assert not out.exists() and not (tmp_path / "escaped.npz").exists()
  run = _convert("folder", root, a_file / "out")
  assert run.returncode != 0 and "a_file is a file, not a folder" in run.stderr, run.stderr
  run = _convert("folder", root, a_file)
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "a_file is a file, not a folder" in lines[0], run.stderr
  assert a_file.read_text() == "not a folder"


class _RunsCode:
  def __reduce__(self):
    return (eval, ("__import__('os').system('touch PWNED')",))


class _RunsShell:
  def __reduce__(self):
    import os
    return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("payload", [_RunsCode(), _RunsShell()])
def test_a_crafted_cifar_pickle_cannot_run_code(tmp_path, monkeypatch, payload):
  source = tmp_path / "cifar-10-batches-py"
  source.mkdir()
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    _write_cifar_batch(source / name, np.zeros((1, 32, 32, 3), np.uint8), [0], b"labels")
  with open(source / "batches.meta", "wb") as handle:
    pickle.dump({b"label_names": [b"a"], b"x": payload}, handle)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(DataError, match=r"batches.meta: refused to load .*(builtins\.eval|"
                                      r"posix\.system).*not CIFAR data") as error:
    convert.read_cifar_python(str(source))
  assert "\n" not in str(error.value) and not (tmp_path / "PWNED").exists()
  run = _convert("cifar", source, tmp_path / "out", cwd=tmp_path)
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert run.returncode != 0 and len(lines) == 1 and "refused to load" in lines[0], run.stderr
  assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_cifar_pickles_as_python_2_and_numpy_wrote_them_load(tmp_path):
  """Protocol 2 with numpy arrays and numpy integer labels, as the CIFAR archives hold."""
  source = tmp_path / "cifar-10-batches-py"
  source.mkdir()
  images = np.arange(6 * 32 * 32 * 3, dtype=np.uint32).astype(np.uint8).reshape(6, 32, 32, 3)
  for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
    rows = images[i:i + 1].transpose(0, 3, 1, 2).reshape(1, 3 * 32 * 32)
    with open(source / name, "wb") as handle:
      pickle.dump({b"data": rows, b"labels": [np.int64(i % 3)], b"filenames": [b"x.png"],
                   b"batch_label": "batch"}, handle, protocol=2)
  with open(source / "batches.meta", "wb") as handle:
    pickle.dump({b"label_names": [b"a", b"b", b"c"], b"num_vis": 3072}, handle, protocol=2)
  splits = convert.read_cifar_python(str(source))
  np.testing.assert_array_equal(splits["train"]["images"], images[:5])
  np.testing.assert_array_equal(splits["test"]["labels"], [2])


@pytest.mark.parametrize("show_traceback", [False, True])
def test_an_error_is_one_line_and_aa_flax_traceback_adds_the_traceback(tmp_path,
                                                                      show_traceback):
  env = subprocess_env(1)
  env.pop("AA_FLAX_TRACEBACK", None)
  if show_traceback:
    env["AA_FLAX_TRACEBACK"] = "1"
  result = subprocess.run([sys.executable, "-m", "aa_flax.data.convert", "cifar",
                           str(tmp_path / "missing"), str(tmp_path / "out")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(f"error: DataError: {tmp_path / 'missing'} is neither")
  if show_traceback:
    assert lines[0] == "Traceback (most recent call last):"
    assert "in read_cifar_python" in result.stderr and len(lines) > 3
  else:
    assert len(lines) == 1
  assert not (tmp_path / "out").exists()
