"""Turns data you have into the ``.npz`` files ``config.data.name='npz'`` reads.

Two inputs are understood:

* ``cifar``: the "python version" of CIFAR-10 (``cifar-10-batches-py/``: ``data_batch_1..5``,
  ``test_batch``, ``batches.meta``) or CIFAR-100 (``cifar-100-python/``: ``train``, ``test``,
  ``meta``; fine labels). These files are Python pickles; they are read with an unpickler that
  admits only what they hold (dicts, lists, bytes, str, numbers, numpy arrays), so a crafted
  file is refused instead of running code.
* ``folder``: an image folder with one sub-folder per class (``root/<class>/<image>``),
  classes numbered in sorted order; images are converted to RGB and, when ``size`` is given,
  resized to ``size x size`` (bilinear), otherwise they must all have the same size.

Each output file holds ``images`` uint8 ``[N, H, W, 3]``, ``labels`` int32 ``[N]`` and
``class_names`` (str ``[K]``).

  python -m aa_flax.data.convert cifar cifar-10-batches-py /data/cifar10
  python -m aa_flax.data.convert folder my_images/train /data/mine --size=64 --name=train
"""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np

from aa_flax.errors import DataError, exit_with_error

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# name: (train files, test files, label key, label-names file, label-names key)
MAX_SIZE = 4096  # --size: the largest side length accepted
# The only globals a CIFAR pickle refers to: numpy rebuilding its arrays and scalars (old and
# new module names), and the codec call Python 3 uses for bytes in protocol 2.
_CIFAR_PICKLE_GLOBALS = frozenset({
    (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")} | {
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})
_CIFAR_LAYOUTS = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                "batches.meta", b"label_names"),
    "cifar100": (["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
}


class _CifarUnpickler(pickle.Unpickler):
  """Builds dicts, lists, bytes, str, numbers and numpy arrays; refuses any other global (a
  function or class that a crafted pickle would call)."""

  def __init__(self, handle, path: str):
    super().__init__(handle, encoding="bytes")
    self.path = path

  def find_class(self, module: str, name: str):
    if (module, name) not in _CIFAR_PICKLE_GLOBALS:
      raise DataError(f"{self.path}: refused to load {module}.{name}: CIFAR batches hold only "
                      "dicts, lists, bytes, numbers and numpy arrays, so this file is not CIFAR "
                      "data (unpickling it would call that).")
    return super().find_class(module, name)


def _unpickle(path: str) -> dict:
  try:
    with open(path, "rb") as handle:
      return _CifarUnpickler(handle, path).load()
  except (OSError, pickle.UnpicklingError, EOFError) as error:
    raise DataError(f"{path}: cannot be read as a CIFAR batch ({type(error).__name__}: "
                    f"{error}).") from error


def read_cifar_python(directory: str) -> dict[str, dict[str, np.ndarray]]:
  """Reads a CIFAR-10 or CIFAR-100 "python version" directory.

  Returns ``{'train': arrays, 'test': arrays}`` where ``arrays`` holds ``images`` uint8
  ``[N, 32, 32, 3]``, ``labels`` int32 ``[N]`` and ``class_names`` str ``[K]``.
  """
  for train_files, test_files, label_key, meta_file, names_key in _CIFAR_LAYOUTS.values():
    if all(os.path.isfile(os.path.join(directory, f)) for f in train_files + test_files):
      break
  else:
    raise DataError(f"{directory} is neither a CIFAR-10 (data_batch_1..5, test_batch) nor a "
                    "CIFAR-100 (train, test) python-version directory.")
  meta = _unpickle(os.path.join(directory, meta_file))
  class_names = np.array([name.decode() for name in meta[names_key]])
  splits = {}
  for split, files in (("train", train_files), ("test", test_files)):
    images, labels = [], []
    for name in files:
      batch = _unpickle(os.path.join(directory, name))
      # Rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
      images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
                    .transpose(0, 2, 3, 1))
      labels.append(np.asarray(batch[label_key], np.int32))
    splits[split] = {"images": np.concatenate(images), "labels": np.concatenate(labels),
                     "class_names": class_names}
  return splits


def read_image_folder(root: str, size: int | None = None) -> dict[str, np.ndarray]:
  """Reads ``root/<class>/<image>`` into ``images`` uint8 ``[N, H, W, 3]``, ``labels`` int32
  ``[N]`` and ``class_names`` (sorted sub-folder names; label k is the k-th)."""
  from PIL import Image
  if not os.path.isdir(root):
    raise DataError(f"{root} is not a directory of class folders.")
  class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not class_names:
    raise DataError(f"{root} has no class sub-folders; expected {root}/<class>/<image>.")
  images, labels = [], []
  for label, name in enumerate(class_names):
    for file in sorted(os.listdir(os.path.join(root, name))):
      if not file.lower().endswith(IMAGE_SUFFIXES):
        continue
      path = os.path.join(root, name, file)
      try:
        with Image.open(path) as image:
          image = image.convert("RGB")
          if size:
            image = image.resize((size, size), Image.BILINEAR)
          array = np.asarray(image, np.uint8)
      except OSError as error:
        raise DataError(f"{path}: not a readable image ({error}).") from error
      if images and array.shape != images[0].shape:
        raise DataError(f"{path} is {array.shape[1]}x{array.shape[0]} but earlier images are "
                        f"{images[0].shape[1]}x{images[0].shape[0]}; pass --size to resize "
                        "every image to one size.")
      images.append(array)
      labels.append(label)
  if not images:
    raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders.")
  return {"images": np.stack(images), "labels": np.asarray(labels, np.int32),
          "class_names": np.array(class_names)}


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes ``arrays`` compressed to ``path`` (via a temporary file, so a crash leaves no
  half-written archive)."""
  temporary = f"{path}.tmp.npz"
  np.savez_compressed(temporary, **arrays)
  os.replace(temporary, path)


def _check_arguments(out_dir: str, size: int | None, name: str) -> None:
  """Raises ``DataError`` for an output folder that is (or lies under) a file, a ``--size``
  outside 1..``MAX_SIZE`` or a ``--name`` that is not a plain file name."""
  existing = os.path.abspath(out_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise DataError(f"output folder {out_dir}: {existing} is a file, not a folder; give a "
                    "folder for the .npz files.")
  if size is not None and not 1 <= size <= MAX_SIZE:
    raise DataError(f"--size={size} is invalid; give a side length from 1 to {MAX_SIZE} "
                    "pixels (or leave it out to keep the images' own size).")
  if not name or name in (".", "..") or os.path.basename(name) != name or "/" in name \
      or "\\" in name:
    raise DataError(f"--name={name!r} must be a plain file name (no folder, e.g. 'train'); "
                    "the file is written into the output folder.")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m aa_flax.data.convert",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("kind", choices=("cifar", "folder"))
  parser.add_argument("source", help="CIFAR python-version directory, or image folder root")
  parser.add_argument("out_dir", help="directory for the .npz files (created if needed)")
  parser.add_argument("--size", type=int, default=None, help="folder: resize to size x size")
  parser.add_argument("--name", default="train", help="folder: output file name (no suffix)")
  args = parser.parse_args(argv)
  try:
    _check_arguments(args.out_dir, args.size, args.name)
    if args.kind == "cifar":
      outputs = read_cifar_python(args.source)
    else:
      outputs = {args.name: read_image_folder(args.source, args.size)}
  except DataError as error:
    exit_with_error(error)
  os.makedirs(args.out_dir, exist_ok=True)
  for name, arrays in outputs.items():
    path = os.path.join(args.out_dir, f"{name}.npz")
    write_npz(path, arrays)
    print(f"{path}: {len(arrays['labels'])} images of {arrays['images'].shape[1:]} "
          f"in {len(arrays['class_names'])} classes")


if __name__ == "__main__":
  main()
