"""Workdir files on any storage: local paths and cloud URLs (``gs://``, ``s3://``, ...).

Every file a run reads or writes in its workdir goes through ``etils.epath``, the path type
orbax uses for checkpoints: local paths via ``os``, URLs via fsspec (``gcsfs`` for ``gs://``,
``s3fs`` for ``s3://``) or, when TensorFlow is installed, ``tf.io.gfile``.

Local files keep POSIX guarantees (atomic rename, append). Object stores have neither: an
object is replaced whole, a "directory" is a key prefix, and moving one is copy then delete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from typing import Any

from etils import epath

from aa_flax.errors import WorkdirError


SCHEMES = ("gs", "s3", "az")  # object stores etils.epath writes to (through fsspec)


def is_remote(location: str | os.PathLike) -> bool:
  """True for URLs such as ``gs://bucket/run``; False for local paths."""
  return "://" in os.fspath(location)


def path(location: str | os.PathLike) -> epath.Path:
  """``location`` as an ``epath.Path``; local paths are made absolute. Raises
  ``WorkdirError`` for a URL scheme other than ``SCHEMES``."""
  location = os.fspath(location)
  scheme = location.split("://", 1)[0] if is_remote(location) else None
  if scheme is not None and scheme not in SCHEMES:
    raise WorkdirError(f"{location}: unsupported scheme '{scheme}://'; use a local path, "
                       f"{', '.join(f'{s}://' for s in SCHEMES)}.")
  return epath.Path(location if is_remote(location) else os.path.abspath(location))


def finite_or_none(value: Any) -> Any:
  """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``, recursively."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {key: finite_or_none(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_none(item) for item in value]
  return value


def dumps(payload: Any, **kwargs) -> str:
  """Strict JSON (``allow_nan=False``): non-finite numbers become ``null``."""
  return json.dumps(finite_or_none(payload), allow_nan=False, **kwargs)


def write_text(target: epath.Path, text: str) -> None:
  """Replaces ``target`` whole: a reader sees the old or the new text, never a mix."""
  if is_remote(target):
    target.write_text(text)  # an object upload is atomic
    return
  temporary = target.parent / f"{target.name}.tmp"
  temporary.write_text(text)
  os.replace(temporary, target)


def write_json(target: epath.Path, payload: dict[str, Any]) -> None:
  write_text(target, dumps(payload, indent=2, sort_keys=True) + "\n")


def create_exclusive(target: epath.Path, text: str) -> bool:
  """Creates ``target`` holding ``text`` unless it exists; returns whether it did.

  Atomic on local disks (a hard link of a complete file) and on ``gs://`` (an upload with a
  does-not-exist precondition); elsewhere, an existence check then an upload.
  """
  if is_remote(target):
    import fsspec
    filesystem, key = fsspec.core.url_to_fs(os.fspath(target))
    try:
      filesystem.pipe_file(key, text.encode(), mode="create")
    except FileExistsError:
      return False
    return True
  temporary = target.parent / f"{target.name}.{os.getpid()}.tmp"
  temporary.write_text(text)
  try:
    os.link(temporary, target)
  except FileExistsError:
    return False
  finally:
    temporary.unlink()
  return True


def list_files(directory: epath.Path) -> list[str]:
  """Paths (relative to ``directory``, sorted) of every file below ``directory``."""
  # fsspec walks report roots without the URL scheme; strip it from the top as well.
  top = os.fspath(directory).split("://", 1)[-1].rstrip("/")
  files = []
  for root, _, names in directory.walk():
    relative = os.fspath(root).split("://", 1)[-1][len(top):].strip("/")
    files.extend(f"{relative}/{name}" if relative else name for name in names)
  return sorted(files)


def move_tree(source: epath.Path, target: epath.Path) -> None:
  """Moves directory ``source`` to ``target`` (whose parent must exist)."""
  if not is_remote(source):
    source.rename(target)
    return
  for name in list_files(source):
    (source / name).copy(target / name)
  source.rmtree()


def check_workdir(workdir: epath.Path, required_bytes: int) -> None:
  """Raises ``WorkdirError`` if ``workdir`` cannot be created/written or lacks free space.

  ``required_bytes`` is what the checkpoints will need (state size x checkpoints kept + 1);
  free space is only known for local disks.
  """
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    probe.write_bytes(b"0" * 4096)
    probe.unlink()
  except Exception as error:  # noqa: BLE001 - cloud storage clients raise their own types.
    raise WorkdirError(f"Workdir {workdir} is not writable: {error}.") from error
  if is_remote(workdir):
    return
  free = shutil.disk_usage(workdir).free
  if free < required_bytes:
    raise WorkdirError(
        f"Workdir {workdir} has {free / 2**20:.1f} MiB free but the checkpoints need about "
        f"{required_bytes / 2**20:.1f} MiB (config.keep_checkpoints + 1 copies of the train "
        "state). Free space, choose another --workdir or lower keep_checkpoints.")
