"""grain pipelines: an endless shuffled training stream and one exact pass over the eval set.

Training: ``source -> shuffle (new order each epoch) -> repeat forever -> augment -> this
process's share -> batch``. The k-th example of the global stream is fixed by ``seed`` alone;
process ``p`` of ``P`` takes stream positions ``p, p + P, ...``, so global batch ``b`` holds
stream positions ``[b*B, (b+1)*B)`` whatever the process count. Epochs run into each other
(no example is dropped). A stream can start at any position ``s`` (in examples, not batches):
saving the position with a checkpoint makes a resumed run read exactly what the uninterrupted
one would have, with any batch size and any number of worker processes.

Eval: global eval batch ``b`` puts example ``b*G + p*L + s`` in slot ``s`` of process ``p``
(``G`` global, ``L = G/P`` local batch); slots past the end repeat an example with
``mask = 0``, so every example is counted exactly once on any number of processes.

Batches are made by ``num_threads`` threads, each building whole batches; with
``num_workers > 0`` they are made in that many worker processes instead (the threads split
among them), which scales the per-example Python work with CPU cores. Worker ``k`` of ``N``
makes batches ``k, k + N, ...`` and they are read back in order, so the batches are the
same either way.

Worker processes end with the process that started them, even when it is killed (they watch
its pid); the shared memory that carried their batches is then reclaimed by the resource
tracker of Python's ``multiprocessing``, which ends with the last of them.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import math
import os
import sys
import threading
import time
from typing import Any, Iterator

import numpy as np

from aa_flax.data import preprocess
from aa_flax.data.sources import TFDS_DATASETS, DatasetSplits
from aa_flax.errors import ConfigError

AUTO_WORKERS = -1  # config.data.num_workers: pick by dataset and host (``resolve_num_workers``)
MAX_AUTO_WORKERS = 32


def resolve_num_workers(requested: int, dataset_name: str) -> int:
  """Worker processes for ``config.data.num_workers = requested``.

  ``-1`` (auto): one per usable CPU core (at most 32) for tfds datasets on a host with more
  than one core, else 0 (in-process threads; the small in-memory datasets need no more).
  Auto is 0 too where worker processes cannot start (``_unstartable_main``).
  """
  if requested < AUTO_WORKERS:
    raise ConfigError(f"config.data.num_workers={requested} is invalid; use 0 (no worker "
                      "processes), a positive count, or -1 (automatic).")
  if requested != AUTO_WORKERS:
    return requested
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if dataset_name in TFDS_DATASETS and (cores or 1) > 1 and not _unstartable_main():
    return min(cores, MAX_AUTO_WORKERS)
  return 0


def _unstartable_main() -> str | None:
  """Why worker processes cannot start here, or None. They are spawned, and a spawned
  process re-imports the main script by its path, which a script read from standard input
  does not have (notebooks and ``python -c`` have no main path and are fine)."""
  main_file = getattr(sys.modules.get("__main__"), "__file__", None)
  if main_file and not os.path.exists(main_file):
    return (f"worker processes cannot start from a main script that is not a file "
            f"({main_file!r})")
  return None


@dataclasses.dataclass(frozen=True)
class InputPipeline:
  """Per-process batches of ``{'image': uint8 [L, h, w, C], 'label': int32 [L]}`` (+ ``mask``).

  ``L = global_batch_size / process_count``; ``(h, w) = image_size``. ``num_threads`` reader
  threads in all; ``num_workers`` worker processes that share them (0: threads in this
  process only).
  """
  splits: DatasetSplits
  global_batch_size: int
  eval_global_batch_size: int
  image_size: tuple[int, int]
  augment: str
  seed: int
  process_index: int = 0
  process_count: int = 1
  num_threads: int = 4
  prefetch: int = 8
  num_workers: int = 0

  def __post_init__(self):
    preprocess.check_augment(self.augment)
    if self.num_workers < 0:
      raise ConfigError(f"num_workers={self.num_workers} must be >= 0 (resolve the automatic "
                        "choice with resolve_num_workers first).")
    blocker = self.num_workers > 0 and _unstartable_main()
    if blocker:
      raise ConfigError(f"config.data.num_workers={self.num_workers}: {blocker}; set it to 0.")

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def eval_local_batch_size(self) -> int:
    return self.eval_global_batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> float:
    return len(self.splits.train) / self.global_batch_size

  @property
  def num_eval_examples(self) -> int:
    return len(self.splits.eval)

  @property
  def num_eval_batches(self) -> int:
    return math.ceil(self.num_eval_examples / self.eval_global_batch_size)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """Shape ``(h, w, C)`` of a preprocessed image."""
    return (*self.image_size, self.splits.image_shape[-1])

  def train_dataset(self, start: int = 0):
    """This process's training batches from global stream position ``start`` (an example
    count) as a random-access ``grain.MapDataset``."""
    import grain
    dataset = (grain.MapDataset.source(self.splits.train).seed(self.seed).shuffle().repeat()
               .random_map(preprocess.TrainTransform(self.augment, self.image_size)))
    dataset = dataset[start + self.process_index::self.process_count]
    return dataset.batch(self.local_batch_size, drop_remainder=True)

  def train_iterator(self, start: int = 0) -> "TrainBatches":
    """Training batches from stream position ``start`` (examples); close it (or use it in a
    ``with`` block) to stop its worker processes."""
    return TrainBatches(self.batch_iterator(self.train_dataset(start)))

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of one pass over the eval split, with ``mask`` float32 [L]."""
    import grain
    load = _EvalSlot(self.splits.eval, preprocess.EvalTransform(self.augment, self.image_size),
                     self.eval_global_batch_size, self.eval_local_batch_size,
                     self.process_index)
    dataset = (grain.MapDataset.range(self.num_eval_batches * self.eval_local_batch_size)
               .map(load).batch(self.eval_local_batch_size))
    iterator = self.batch_iterator(dataset)
    try:
      yield from iterator
    finally:
      _close(iterator)

  def batch_iterator(self, dataset):
    """Iterates a ``grain.MapDataset`` of batches with this pipeline's threads and workers."""
    import grain
    threads = self.num_threads
    if self.num_workers > 0:
      threads = max(1, math.ceil(threads / self.num_workers))  # each worker's share
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=self.prefetch))
    if self.num_workers > 0:
      _mark_absl_flags_parsed()
      iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers,
          per_worker_buffer_size=max(1, math.ceil(self.prefetch / self.num_workers))),
          worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
      _delete_shared_memory_where_freed()
      _release_shared_memory_at_exit()
    return iter(iter_dataset)


class TrainBatches:
  """An endless iterator of training batches that stops its worker processes on ``close``."""

  def __init__(self, iterator):
    self._iterator = iterator

  def __iter__(self) -> "TrainBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def close(self) -> None:
    _close(self._iterator)

  def __enter__(self) -> "TrainBatches":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


@dataclasses.dataclass(frozen=True)
class _EvalSlot:
  """Eval slot ``i`` of this process -> its preprocessed record with ``mask`` (see module
  docstring); a plain object so that worker processes can run it."""
  source: Any
  transform: preprocess.EvalTransform
  global_batch: int
  local_batch: int
  process_index: int

  def __call__(self, slot: int) -> dict[str, Any]:
    batch, offset = divmod(slot, self.local_batch)
    index = batch * self.global_batch + self.process_index * self.local_batch + offset
    record = self.transform(self.source[index % len(self.source)])
    record["mask"] = np.float32(index < len(self.source))
    return record


def _mark_absl_flags_parsed() -> None:
  """grain (0.2.18 and earlier releases) reads absl flags when it starts worker processes;
  outside an absl app (plain Python, notebooks) nothing parsed them, and reading raises
  ``UnparsedFlagAccessError``. Their defaults are declared final here."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


PARENT_CHECK_S = 0.5


def _exit_with_parent(parent_pid: int, worker_index: int, num_workers: int) -> None:
  """Runs in each worker process: a thread ends the worker within ``PARENT_CHECK_S`` of
  its parent's death (a killed trainer cannot stop its workers itself)."""
  del worker_index, num_workers  # the same for every worker

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(PARENT_CHECK_S)
    os._exit(1)

  threading.Thread(target=watch, daemon=True, name="aa_flax-exit-with-parent").start()


def _close(iterator) -> None:
  """Closes a grain iterator and frees the batches it still held."""
  close = getattr(iterator, "close", None)
  if close is not None:
    close()
    _release_shared_memory()


def _release_shared_memory() -> None:
  """Frees the shared memory of the worker batches no longer referenced, now.

  Their arrays unlink it when deleted (``_delete_shared_memory_where_freed``); the buffers
  of a closed iterator are in reference cycles, so they wait for the garbage collector.
  What is still pending at interpreter exit is reported as leaked.
  """
  gc.collect()


@functools.cache
def _delete_shared_memory_where_freed() -> None:
  """Makes grain (0.2.x) unlink a worker batch's shared memory on the thread that frees it.

  Its default hands the close and unlink to a background thread. When the garbage
  collector frees a batch (the last one of an exhausted worker stays in a reference cycle
  with the end-of-stream exception), it also closes the segment's ``SharedMemory`` on the
  collecting thread; the two closes can overlap, the background one then fails on a closed
  descriptor, and the segment is never unlinked. With no permits, grain deletes in place.
  """
  from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
  SharedMemoryArray.enable_async_del(1)
  SharedMemoryArray._outstanding_del_requests = threading.Semaphore(0)


@functools.cache
def _release_shared_memory_at_exit() -> None:
  atexit.register(_release_shared_memory)
