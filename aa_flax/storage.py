"""Workdir files on any storage: local paths and cloud URLs (``gs://``, ``s3://``, ...).

Every file a run reads or writes in its workdir goes through ``etils.epath``, the path type
orbax uses for checkpoints: local paths via ``os``, URLs via fsspec (``gcsfs`` for ``gs://``,
``s3fs`` for ``s3://``) or, when TensorFlow is installed, ``tf.io.gfile``.

Local files keep POSIX guarantees (atomic rename, append). Object stores have neither: an
object is replaced whole, a "directory" is a key prefix, and moving one is copy then delete.

Object stores also have bad minutes. ``is_transient`` tells an outage (HTTP 5xx, 429 or 408,
timeouts, dropped connections; as raised by gcsfs, aiohttp, requests or tensorstore) from
everything else, and ``retrying`` repeats an operation through one with backoff for
``retry_seconds()`` (``config.storage_retry_s``), then raises ``StorageUnavailableError``.
A local ``OSError`` such as EIO or EACCES is not transient.
"""

from __future__ import annotations

import json
import logging as python_logging
import math
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, Callable, TypeVar

from absl import logging
from etils import epath

from aa_flax.errors import AAFlaxError, StorageUnavailableError, WorkdirError

DEFAULT_RETRY_S = 300.0
_retry_s = DEFAULT_RETRY_S
# tensorstore reports an HTTP failure as a ValueError naming the response code, e.g.
# "ABORTED: All 32 retry attempts failed: ... [http_response_code='503']"; it retries only
# what it deems transient (5xx, 429, 408, dropped connections: curl errors), so running out
# of retries is an outage too.
_TENSORSTORE_TRANSIENT = re.compile(
    r"http_response_code='(5\d\d|429|408)'|^(UNAVAILABLE|DEADLINE_EXCEEDED):|"
    r"^ABORTED: All \d+ retry attempts failed")
_T = TypeVar("_T")


def first_line(error: BaseException, limit: int = 300) -> str:
  """``"<type>: <first line of the message>"`` of ``error``, for one-line reports."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:limit] if text else ''}"


def set_retry_seconds(seconds: float) -> None:
  """How long ``retrying`` keeps retrying an operation through a storage outage."""
  global _retry_s
  _retry_s = float(seconds)


def retry_seconds() -> float:
  return _retry_s


def _is_transient_one(error: BaseException) -> bool:
  if isinstance(error, (TimeoutError, ConnectionError)):  # incl. asyncio's timeouts, resets
    return True
  if "gcsfs" in sys.modules:
    from gcsfs import retry as gcsfs_retry
    if gcsfs_retry.is_retriable(error):  # HttpError 5xx/408/429, aiohttp and requests errors
      return True
  return isinstance(error, ValueError) and bool(_TENSORSTORE_TRANSIENT.search(str(error)))


def is_transient(error: BaseException) -> bool:
  """True if ``error`` (or an exception it was raised from) is a storage outage that may
  pass: worth retrying, never evidence of damaged data."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, AAFlaxError):  # already decided (e.g. retried and given up)
      return False
    if _is_transient_one(error):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


def unavailable(what: str, error: BaseException) -> StorageUnavailableError:
  """The ``StorageUnavailableError`` that ends a run on a transient ``error`` at ``what``."""
  return StorageUnavailableError(
      f"{what}: storage unavailable ({first_line(error)}), retried for {_retry_s:g} s "
      "(config.storage_retry_s). Nothing was moved or marked corrupt; rerun the same command "
      "once the storage is back.")


def retrying(what: str, function: Callable[..., _T], *args, **kwargs) -> _T:
  """``function(*args, **kwargs)``, repeated with backoff while it fails with a transient
  error (``is_transient``) for up to ``retry_seconds()``; then ``StorageUnavailableError``
  naming ``what`` (the object or operation). Other errors propagate at once."""
  deadline = time.monotonic() + _retry_s
  delay = 0.25
  while True:
    try:
      return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - classified here, re-raised unless transient
      if not is_transient(error):
        raise
      if time.monotonic() + delay > deadline:
        raise unavailable(what, error) from error
      logging.warning("%s: %s; retrying in %.1f s.", what, first_line(error), delay)
      time.sleep(delay)
      delay = min(2 * delay, 30.0)


def _no_client_tracebacks(record) -> bool:
  """gcsfs logs a traceback when its own retries run out (ours go on) and when a move's
  server-side rewrite is refused (it falls back to copy and delete): one line is enough."""
  record.exc_info, record.exc_text = None, None
  return record.levelno >= python_logging.ERROR and "out of retries" not in str(record.msg) \
      and "non-retriable" not in str(record.msg)


python_logging.getLogger("gcsfs").addFilter(_no_client_tracebacks)


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
  retrying(f"Writing {target}", _replace_text, target, text)


def _replace_text(target: epath.Path, text: str) -> None:
  if is_remote(target):
    target.write_text(text)  # an object upload is atomic
    return
  temporary = target.parent / f"{target.name}.tmp"
  temporary.write_text(text)
  os.replace(temporary, target)


def read_text(source: epath.Path) -> str:
  """The text of ``source`` (retried through outages; ``FileNotFoundError`` if absent)."""
  return retrying(f"Reading {source}", source.read_text)


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
      retrying(f"Creating {target}", filesystem.pipe_file, key, text.encode(), mode="create")
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
  return retrying(f"Listing {directory}", _list_files, directory)


def _list_files(directory: epath.Path) -> list[str]:
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
    retrying(f"Copying {source / name}", (source / name).copy, target / name, overwrite=True)
  retrying(f"Deleting {source}", source.rmtree)


def _refusals() -> tuple[type[Exception], ...]:
  """What storage clients raise when they refuse an operation: ``OSError`` (local disks;
  gcsfs and s3fs for 403 and 404), ``ValueError`` (gcsfs's bad request) and gcsfs's
  ``HttpError`` (other 4xx)."""
  if "gcsfs" not in sys.modules:
    return (OSError, ValueError)
  from gcsfs.retry import HttpError
  return (OSError, ValueError, HttpError)


def _write_probe(workdir: epath.Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  probe = workdir / f".write_probe.{socket.gethostname()}.{os.getpid()}"
  probe.write_bytes(b"0" * 4096)
  probe.unlink()


def check_workdir(workdir: epath.Path, required_bytes: int) -> None:
  """Raises ``WorkdirError`` if ``workdir`` cannot be created/written or lacks free space.

  ``required_bytes`` is what the checkpoints will need (state size x checkpoints kept + 1);
  free space is only known for local disks.
  """
  try:
    retrying(f"Writing a probe file in {workdir}", _write_probe, workdir)
  except StorageUnavailableError:
    raise
  except _refusals() as error:
    raise WorkdirError(f"Workdir {workdir} is not writable: {error}.") from error
  if is_remote(workdir):
    return
  free = shutil.disk_usage(workdir).free
  if free < required_bytes:
    raise WorkdirError(
        f"Workdir {workdir} has {free / 2**20:.1f} MiB free but the checkpoints need about "
        f"{required_bytes / 2**20:.1f} MiB (config.keep_checkpoints + 1 copies of the train "
        "state). Free space, choose another --workdir or lower keep_checkpoints.")
