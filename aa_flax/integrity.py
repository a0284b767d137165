"""Checkpoint digests: the SHA-256 of every file of a checkpoint, written once the save is
complete and compared before a restore, so bytes that changed at rest are caught even when
they still parse.

The digest is ``<step dir>/aa_flax_digest.json``: ``{"algorithm": "sha256", "files":
{relative path: hex digest}}``. It covers every file orbax writes for the items (array data,
tree metadata, JSON) except orbax's commit bookkeeping, which orbax writes after it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json

from etils import epath

from aa_flax import storage

DIGEST_FILE = "aa_flax_digest.json"
# Written by orbax at commit time, after the digest: commit markers and the step's metadata
# (timestamps). They hold no array data, and a damaged one makes the step unreadable anyway.
_UNCOVERED = frozenset({DIGEST_FILE, "commit_success.txt", "_CHECKPOINT_METADATA"})
_CHUNK_BYTES = 8 << 20


class DigestMismatchError(ValueError):
  """A checkpoint file differs from what its digest recorded when it was saved."""


def _covered_files(directory: epath.Path) -> list[str]:
  return [name for name in storage.list_files(directory)
          if name.rsplit("/", 1)[-1] not in _UNCOVERED]


def _sha256(file: epath.Path) -> str:
  return storage.retrying(f"Reading {file}", _sha256_once, file)


def _sha256_once(file: epath.Path) -> str:
  digest = hashlib.sha256()
  with file.open("rb") as handle:
    while chunk := handle.read(_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def _hash_files(directory: epath.Path, names: list[str]) -> dict[str, str]:
  """``{name: sha256}``; files are hashed in parallel (hashlib releases the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    return dict(zip(names, pool.map(lambda name: _sha256(directory / name), names)))


def write_digest(directory: epath.Path) -> None:
  """Hashes every covered file below ``directory`` into ``directory/aa_flax_digest.json``."""
  files = _hash_files(directory, _covered_files(directory))
  storage.write_text(directory / DIGEST_FILE,
                     storage.dumps({"algorithm": "sha256", "files": files}, indent=1))


def verify_digest(directory: epath.Path) -> bool:
  """Compares the files below ``directory`` with its digest; returns True if they match.

  Raises ``DigestMismatchError`` naming the first differing, missing or unexpected file, or
  when the digest itself is missing or unreadable (every committed step has one: it is written
  before the commit). Reads are retried through storage outages (``storage.retrying``).
  """
  digest_file = directory / DIGEST_FILE
  try:
    expected = json.loads(storage.read_text(digest_file))["files"]
  except FileNotFoundError as error:
    raise DigestMismatchError(f"{directory} has no {DIGEST_FILE}; a committed checkpoint "
                              "always has one, so its files cannot be trusted.") from error
  except (ValueError, KeyError, TypeError) as error:
    raise DigestMismatchError(f"{digest_file} is unreadable ({error}).") from error
  names = _covered_files(directory)
  if set(names) != set(expected):
    missing, unexpected = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    raise DigestMismatchError(f"{directory}: files missing {missing}, unexpected "
                              f"{unexpected} compared with its digest.")
  actual = _hash_files(directory, names)
  for name in names:
    if actual[name] != expected[name]:
      raise DigestMismatchError(f"{directory / name}: SHA-256 {actual[name][:12]}... differs "
                                f"from the digest written at save ({expected[name][:12]}...).")
  return True
