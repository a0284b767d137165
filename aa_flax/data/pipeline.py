"""grain pipelines: an endless shuffled training stream and one exact pass over the eval set.

Training: ``source -> shuffle (new order each epoch) -> repeat forever -> augment -> this
process's share -> batch``. The k-th example of the global stream is fixed by ``seed`` alone;
process ``p`` of ``P`` takes stream positions ``p, p + P, ...``, so global batch ``b`` holds
stream positions ``[b*B, (b+1)*B)`` whatever the process count. Epochs run into each other
(no example is dropped). A stream can start at any position ``s`` (in examples, not batches):
saving the position with a checkpoint makes a resumed run read exactly what the uninterrupted
one would have, with any batch size.

Eval: global eval batch ``b`` puts example ``b*G + p*L + s`` in slot ``s`` of process ``p``
(``G`` global, ``L = G/P`` local batch); slots past the end repeat an example with
``mask = 0``, so every example is counted exactly once on any number of processes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import numpy as np

from aa_flax.data import preprocess
from aa_flax.data.sources import DatasetSplits


@dataclasses.dataclass(frozen=True)
class InputPipeline:
  """Per-process batches of ``{'image': uint8 [L, h, w, C], 'label': int32 [L]}`` (+ ``mask``).

  ``L = global_batch_size / process_count``; ``(h, w) = image_size``.
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

  def __post_init__(self):
    preprocess.check_augment(self.augment)

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

  def _read_options(self):
    import grain
    return grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)

  def train_dataset(self, start: int = 0):
    """This process's training batches from global stream position ``start`` (an example
    count) as a random-access ``grain.MapDataset``."""
    import grain
    dataset = (grain.MapDataset.source(self.splits.train).seed(self.seed).shuffle().repeat()
               .random_map(preprocess.train_transform(self.augment, self.image_size)))
    dataset = dataset[start + self.process_index::self.process_count]
    return dataset.batch(self.local_batch_size, drop_remainder=True)

  def train_iterator(self, start: int = 0):
    """A grain iterator over training batches from stream position ``start``."""
    return iter(self.train_dataset(start).to_iter_dataset(self._read_options()))

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of one pass over the eval split, with ``mask`` float32 [L]."""
    import grain
    num_examples, local = self.num_eval_examples, self.eval_local_batch_size
    transform = preprocess.eval_transform(self.augment, self.image_size)

    def load(slot: int) -> dict[str, Any]:
      batch, offset = divmod(slot, local)
      index = batch * self.eval_global_batch_size + self.process_index * local + offset
      record = transform(self.splits.eval[index % num_examples])
      record["mask"] = np.float32(index < num_examples)
      return record

    dataset = grain.MapDataset.range(self.num_eval_batches * local).map(load).batch(local)
    return iter(dataset.to_iter_dataset(self._read_options()))
