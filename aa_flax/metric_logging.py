"""Metrics out: ``<workdir>/metrics.jsonl`` (local disks) or ``<workdir>/metrics/*.jsonl``
chunks (object stores), and TensorBoard event files in ``<workdir>/tensorboard`` (tensorboardX;
no TensorFlow). Only process 0 writes. Read a workdir's records with ``read_records``.

Each record is one line of strict JSON ``{"step": int, "split": "train" | "eval",
<name>: float or null, ...}`` (null: no value, e.g. a window whose steps were all skipped).

Every write goes through a background thread, so ``MetricLogger.write`` returns at once
whatever the storage does, and costs O(the new records):

* Local disks: each record is appended to ``metrics.jsonl``; TensorBoard writes its event file
  in place.
* Object stores (``gs://...``), which cannot append: records are buffered and written as
  numbered chunk objects ``metrics/000001.jsonl``, ``metrics/000002.jsonl``, ... (readers
  concatenate them in order) at every ``flush`` (the trainer flushes before each checkpoint)
  and at ``close``; in between, a record is stored at once when the last chunk is older than
  ``FLUSH_INTERVAL_S`` (so a run's first record shows at once), else at the interval's end.
  A failed store keeps its records for the next one; ``flush`` and ``close`` raise its error.
  TensorBoard events are staged locally and each flush uploads one new event file holding the
  events since the previous one (TensorBoard reads a directory's event files in name order:
  ``tensorboard --logdir gs://bucket/run/tensorboard``).
"""

from __future__ import annotations

import concurrent.futures
import json
import queue
import shutil
import tempfile
import threading
import time
from typing import Any

from absl import logging
from etils import epath

from aa_flax import storage
from aa_flax.workdir import METRICS_CHUNK_DIR, METRICS_FILE, TENSORBOARD_DIR

FLUSH_INTERVAL_S = 60.0  # object stores: buffered records wait at most this long


def _chunk_paths(workdir: epath.Path) -> list[epath.Path]:
  """``<workdir>/metrics/<number>.jsonl`` in number order."""
  directory = workdir / METRICS_CHUNK_DIR
  if not directory.exists():
    return []
  chunks = [path for path in directory.iterdir()
            if path.name.endswith(".jsonl") and path.name[:-len(".jsonl")].isdigit()]
  return sorted(chunks, key=lambda path: int(path.name[:-len(".jsonl")]))


def _record_files(workdir: epath.Path) -> list[epath.Path]:
  """The files that hold ``workdir``'s records, in record order."""
  single = workdir / METRICS_FILE
  return ([single] if single.exists() else []) + _chunk_paths(workdir)


def _parse(line: str) -> dict[str, Any] | None:
  """A record, or ``None`` for a line cut short by a kill."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) and "step" in record and "split" in record else None


def read_records(workdir: str | epath.Path) -> list[dict[str, Any]]:
  """Every metric record of ``workdir`` (local or a URL) in the order written; lines cut short
  by a kill are skipped. The one reader of ``metrics.jsonl`` and of the chunks."""
  files = _record_files(storage.path(workdir))
  with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
    texts = list(pool.map(lambda path: path.read_text(), files))
  records = (_parse(line) for text in texts for line in text.splitlines() if line.strip())
  return [record for record in records if record is not None]


class MetricLogger:
  """Writes metric records from a background thread; a no-op on processes other than 0
  (``enabled=False``). ``flush`` before a checkpoint, ``close`` at the end (also on errors)."""

  def __init__(self, workdir: epath.Path, enabled: bool, resume_step: int = 0):
    """``resume_step > 0``: TensorBoard drops events after it written by an earlier run."""
    self.enabled = enabled
    self.workdir = workdir
    # Chunks also on a local copy of an object-store workdir, so that order is kept.
    self._chunked = storage.is_remote(workdir) or (workdir / METRICS_CHUNK_DIR).exists()
    self._resume_step = resume_step
    self._queue: queue.Queue = queue.Queue()
    self._pending: list[str] = []  # lines not yet written (writer thread only)
    self._error: BaseException | None = None  # the last failed write, until one succeeds
    self._event_files = 0  # object stores: event files started by this logger
    self._tensorboard = None
    self._staging = None
    self._thread = None
    if not enabled:
      return
    self._next_chunk = self._first_free_chunk()
    if self._chunked:
      self._staging = epath.Path(tempfile.mkdtemp(prefix="aa_flax_tensorboard_"))
    self._thread = threading.Thread(target=self._work, name="aa_flax-metrics", daemon=True)
    self._thread.start()

  def _first_free_chunk(self) -> int:
    chunks = _chunk_paths(self.workdir)
    return int(chunks[-1].name[:-len(".jsonl")]) + 1 if chunks else 1

  def truncate_after(self, step: int, keep_evals_at_step: bool = True) -> None:
    """Drops records newer than ``step`` (written by a run that died after its checkpoint),
    and eval records at ``step`` too unless ``keep_evals_at_step``. Call before ``write``.

    Records are in step order, so only the newest files are read: files holding nothing to
    keep are deleted newest first (a kill leaves a prefix), then the file holding the cut is
    rewritten whole (atomically)."""
    if not self.enabled:
      return

    def kept(record: dict[str, Any] | None) -> bool:
      return record is not None and (record["step"] < step or (record["step"] == step and (
          keep_evals_at_step or record["split"] != "eval")))

    for path in reversed(_record_files(self.workdir)):
      lines = [line for line in path.read_text().splitlines() if line.strip()]
      keep = [line + "\n" for line in lines if kept(_parse(line))]
      if len(keep) == len(lines):
        break
      if keep or path.name == METRICS_FILE:
        storage.write_text(path, "".join(keep))
        break
      path.unlink()
    self._next_chunk = self._first_free_chunk()

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """Queues one record; returns at once (the writer thread stores it)."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    self._queue.put(("record", record))

  def flush(self) -> None:
    """Returns once every record written so far is stored (TensorBoard follows in the
    background); raises the storage error if they cannot be."""
    self._request("flush")

  def close(self) -> None:
    """Stores everything (records and TensorBoard events) and stops the writer thread;
    raises the storage error if the records cannot be stored."""
    if self._thread is None:
      return
    try:
      self._request("close")
    finally:
      self._thread.join()
      self._thread = None
      if self._staging is not None:
        shutil.rmtree(self._staging, ignore_errors=True)

  def _request(self, kind: str) -> None:
    if self._thread is None:
      return
    done = threading.Event()
    self._queue.put((kind, done))
    while not done.wait(timeout=1.0):
      if not self._thread.is_alive():  # stopped by an unexpected error, kept in _error
        break
    if self._error is not None:
      raise self._error

  # The writer thread.

  def _work(self) -> None:
    try:
      self._serve()
    except BaseException as error:  # noqa: BLE001 - raised on the caller's thread
      self._error = error

  def _serve(self) -> None:
    last_store = -FLUSH_INTERVAL_S  # the first record is stored at once
    while True:
      timeout = (max(0.0, last_store + FLUSH_INTERVAL_S - time.monotonic())
                 if self._pending else None)
      try:
        kind, payload = self._queue.get(timeout=timeout)
      except queue.Empty:
        kind, payload = "interval", None
      if kind == "record":
        self._pending.append(storage.dumps(payload) + "\n")
        self._add_scalars(payload)
        if self._chunked and time.monotonic() < last_store + FLUSH_INTERVAL_S:
          continue  # buffered until the interval ends or a flush
      self._store()
      last_store = time.monotonic()
      if kind in ("record", "interval"):
        continue
      if kind == "flush":
        payload.set()  # the records are stored; the events follow
      self._flush_tensorboard(closing=kind == "close")
      if kind == "close":
        payload.set()
        return

  def _store(self) -> None:
    """Writes the pending lines (kept for the next try if that fails)."""
    if not self._pending:
      return
    text = "".join(self._pending)
    try:
      if self._chunked:
        chunk = self.workdir / METRICS_CHUNK_DIR / f"{self._next_chunk:06d}.jsonl"
        chunk.parent.mkdir(parents=True, exist_ok=True)
        storage.write_text(chunk, text)
        self._next_chunk += 1
      else:
        _append(self.workdir / METRICS_FILE, text)
    except Exception as error:  # noqa: BLE001 - raised on the caller's thread at flush/close
      self._error = error
      return
    self._pending, self._error = [], None

  def _add_scalars(self, record: dict[str, Any]) -> None:
    if self._tensorboard is None:
      from tensorboardX import SummaryWriter
      logdir = self._staging or self.workdir / TENSORBOARD_DIR
      # On object stores each flush closes the file and uploads it; the next one is new.
      self._event_files += 1
      self._tensorboard = SummaryWriter(
          logdir=str(logdir), filename_suffix=f".{self._event_files:06d}" if self._staging else "",
          purge_step=self._resume_step + 1 if self._resume_step else None)
      self._resume_step = 0  # purged once, by the first event file
    step, split = record["step"], record["split"]
    for name, value in record.items():
      if name not in ("step", "split") and isinstance(value, (int, float)):
        self._tensorboard.add_scalar(f"{split}/{name}", value, step)

  def _flush_tensorboard(self, closing: bool) -> None:
    if self._tensorboard is None:
      return
    if self._staging is None:
      if closing:
        self._tensorboard.close()
      else:
        self._tensorboard.flush()
      return
    self._tensorboard.close()
    self._tensorboard = None
    target = self.workdir / TENSORBOARD_DIR
    try:
      target.mkdir(parents=True, exist_ok=True)
      for event_file in list(self._staging.iterdir()):
        (target / event_file.name).write_bytes(event_file.read_bytes())
        event_file.unlink()
    except Exception as error:  # noqa: BLE001 - events stay staged for the next upload
      logging.warning("TensorBoard events not uploaded to %s yet (%s: %s); retried at the next "
                      "flush.", target, type(error).__name__, error)


def _append(path: epath.Path, text: str) -> None:
  with path.open("a") as handle:
    handle.write(text)


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    return value.item()
  return value
