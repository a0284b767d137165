"""Metric records: one file on local disks, numbered chunks on object stores (simulated here by
a local workdir that already has a ``metrics/`` folder, which the logger then writes chunks
to), written off the caller's thread at a cost that grows with the new records only. A
logger's first record is stored at once, later ones at a flush (or when the flush interval
has passed)."""

import threading
import time

import pytest

from aa_flax import metric_logging, storage
from aa_flax.metric_logging import MetricLogger, read_records


def _chunked_workdir(path):
  (path / metric_logging.METRICS_CHUNK_DIR).mkdir(parents=True)
  return storage.path(path)


def _records(steps, split="train"):
  return [{"step": step, "split": split, "loss": 1.0 / step} for step in steps]


def _log(logger, records):
  for record in records:
    logger.write(record["step"], record["split"],
                 {k: v for k, v in record.items() if k not in ("step", "split")})


@pytest.mark.parametrize("chunked", [False, True])
def test_records_round_trip_and_a_resume_truncates_them(tmp_path, chunked):
  workdir = _chunked_workdir(tmp_path) if chunked else storage.path(tmp_path)
  logger = MetricLogger(workdir, enabled=True)
  written = []
  for first in (1, 4, 7, 10):  # a flush (checkpoint) after every three steps
    batch = _records(range(first, first + 3))
    _log(logger, batch)
    written += batch
    if first == 10:
      written += _records([12], "eval")
      _log(logger, _records([12], "eval"))
    logger.flush()
    assert read_records(workdir) == written
  logger.close()
  chunks = sorted(p.name for p in (tmp_path / "metrics").glob("*.jsonl")) if chunked else []
  assert chunks == ([f"{i:06d}.jsonl" for i in range(1, 6)] if chunked else [])
  assert (tmp_path / "metrics.jsonl").exists() != chunked

  # Killed after the checkpoint of step 5: a resume drops the records after it.
  resumed = MetricLogger(workdir, enabled=True, resume_step=5)
  resumed.truncate_after(5)
  assert read_records(workdir) == written[:5]
  if chunked:  # the chunk holding the cut is rewritten, the later ones deleted
    assert sorted(p.name for p in (tmp_path / "metrics").glob("*.jsonl")) == [
        "000001.jsonl", "000002.jsonl", "000003.jsonl"]
    assert (tmp_path / "metrics" / "000003.jsonl").read_text().count("\n") == 2  # 4 and 5
  _log(resumed, _records([6, 7]))
  resumed.close()
  assert read_records(workdir) == written[:5] + _records([6, 7])

  # Resumed at the last step: its eval record goes (the eval is redone), the train one stays.
  final = MetricLogger(workdir, enabled=True, resume_step=7)
  _log(final, _records([7], "eval"))
  final.close()
  final = MetricLogger(workdir, enabled=True, resume_step=7)
  final.truncate_after(7, keep_evals_at_step=False)
  final.close()
  assert read_records(workdir) == written[:5] + _records([6, 7])


def test_a_line_cut_short_by_a_kill_is_skipped_and_dropped_on_resume(tmp_path):
  workdir = storage.path(tmp_path)
  lines = [storage.dumps(r) for r in _records([1, 2])]
  (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[1][:9])
  assert read_records(workdir) == _records([1, 2])
  logger = MetricLogger(workdir, enabled=True, resume_step=2)
  logger.truncate_after(2)
  logger.close()
  assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"


def test_each_flush_writes_only_the_new_records(tmp_path, monkeypatch):
  writes = []
  write_text = storage.write_text
  monkeypatch.setattr(storage, "write_text",
                      lambda target, text: (writes.append(len(text)), write_text(target, text)))
  workdir = _chunked_workdir(tmp_path)
  logger = MetricLogger(workdir, enabled=True)
  for first in range(1, 200, 2):
    _log(logger, _records([first, first + 1]))
    logger.flush()
  logger.close()
  records = read_records(workdir)
  assert [r["step"] for r in records] == list(range(1, 201))
  line_bytes = max(len(storage.dumps(r)) + 1 for r in records)
  assert len(writes) == 101 and max(writes) <= 2 * line_bytes  # the first record alone
  assert sum(writes) == sum(len(storage.dumps(r)) + 1 for r in records)
  # TensorBoard: one new event file per flush, each holding only that flush's events.
  events = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 100
  assert max(p.stat().st_size for p in events) < 3 * min(p.stat().st_size for p in events)


@pytest.mark.parametrize("chunked", [False, True])
def test_writes_to_a_slow_target_do_not_block_the_caller(tmp_path, monkeypatch, chunked):
  delay, writers = 0.2, set()

  def slow(write):
    def wrapper(target, text):
      writers.add(threading.get_ident())
      time.sleep(delay)
      write(target, text)
    return wrapper

  monkeypatch.setattr(storage, "write_text", slow(storage.write_text))
  monkeypatch.setattr(metric_logging, "_append", slow(metric_logging._append))
  monkeypatch.setattr(metric_logging, "FLUSH_INTERVAL_S", 0.0)  # store every record at once
  workdir = _chunked_workdir(tmp_path) if chunked else storage.path(tmp_path)
  logger = MetricLogger(workdir, enabled=True)
  records = _records(range(1, 11))
  start = time.perf_counter()
  _log(logger, records)
  assert time.perf_counter() - start < delay  # ten slow writes queued, none waited for
  logger.close()
  assert read_records(workdir) == records
  assert writers and threading.get_ident() not in writers


def test_a_failed_store_is_retried_and_reported_at_flush(tmp_path, monkeypatch):
  failures = [OSError("503 Service Unavailable")] * 2  # the first record's store, the flush
  write_text = storage.write_text

  def flaky(target, text):
    if failures:
      raise failures.pop()
    write_text(target, text)

  monkeypatch.setattr(storage, "write_text", flaky)
  workdir = _chunked_workdir(tmp_path)
  logger = MetricLogger(workdir, enabled=True)
  _log(logger, _records([1, 2]))
  with pytest.raises(OSError, match="503"):
    logger.flush()
  _log(logger, _records([3]))
  logger.close()  # the records kept from the failed store go with the next one
  assert read_records(workdir) == _records([1, 2, 3])


def test_other_processes_write_nothing(tmp_path):
  logger = MetricLogger(storage.path(tmp_path), enabled=False)
  _log(logger, _records([1]))
  logger.flush()
  logger.close()
  assert not list(tmp_path.iterdir())
