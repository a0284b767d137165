"""Input pipeline throughput: ImageNet preprocessing in img/s, per core and in total.

Data: real photos (see ``benchmarks/input_data.py``) re-encoded as JPEGs at ImageNet's common
sizes, read through the real loaders: a tfds ``imagenet2012`` dataset prepared in a temporary
directory (ArrayRecord files, read by ``tfds.data_source``) and an ``.npz`` file (decoded
arrays, all at the first size).

Paths:
  * ``before``: the straightforward preprocessing (tfds decodes the whole JPEG, crop, one PIL
    resize per colour channel; ``input_data.Reference*Transform``), run by grain threads.
  * ``after``: ``aa_flax.data.preprocess`` (the crop box resized once, JPEG decoded at reduced
    DCT scale when the crop allows) through ``aa_flax.data.InputPipeline``.

Rows:
  * ``mode=inline``: one core, no grain: transform records one after another (img/s per core).
  * ``mode=threads``: the pipeline with ``--threads`` grain threads in this process.
  * ``mode=processes``: the pipeline with ``--workers`` worker processes (1 reader thread each).
  Pipeline rows time whole batches after each worker's first one (``startup_s``: until then);
  ``per_core`` divides by ``min(threads or workers, usable cores)``.

Examples (the numbers in docs/PERFORMANCE.md; run on an otherwise idle machine):
  python -m benchmarks.bench_input --images 512 --batch 32 --seconds 10
  python -m benchmarks.bench_input --sizes 1200x1600 --sources tfds --name bench_input_large
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np

from aa_flax.config_utils import base_config
from aa_flax.data import InputPipeline, load_splits, preprocess
from benchmarks import common, input_data

COLUMNS = ("source", "split", "path", "mode", "workers", "threads", "img_per_s", "per_core",
           "ms_per_img", "startup_s", "images")


def usable_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def prepare_sources(data_dir: str, num_images: int,
                    sizes: tuple[tuple[int, int], ...] = input_data.IMAGENET_SIZES,
                    seed: int = 0) -> dict[str, Any]:
  """Writes the JPEGs as tfds ``imagenet2012`` and as an npz; returns the opened splits."""
  jpegs = input_data.jpeg_images(num_images, sizes=sizes, seed=seed)
  labels = np.arange(num_images) % 1000
  examples = list(zip(jpegs, labels))
  input_data.write_tfds_imagenet(data_dir, {"train": examples, "validation": examples})
  same_size = input_data.decode_all(input_data.jpeg_images(num_images, sizes=sizes[:1],
                                                           seed=seed))
  npz_path = os.path.join(data_dir, "photos.npz")
  np.savez(npz_path, images=np.stack(same_size), labels=labels.astype(np.int32))
  config = base_config().data
  config.image_size, config.augment = 224, "inception"
  config.name, config.tfds_data_dir = "imagenet2012", data_dir
  tfds_splits = load_splits(config, seed=0)
  config.name, config.train_files, config.eval_files = "npz", npz_path, npz_path
  config.mean, config.std = (0.5,) * 3, (0.25,) * 3
  return {"tfds": tfds_splits, "npz": load_splits(config, seed=0),
          "tfds_decoded": _tfds_decoded(data_dir)}


def _tfds_decoded(data_dir: str):
  """The same tfds splits with tfds decoding the whole JPEG (what ``before`` read)."""
  import tensorflow_datasets as tfds
  from aa_flax.data.sources import TfdsSource
  train, evaluation = tfds.data_source("imagenet2012", split=["train", "validation"],
                                       data_dir=data_dir, download=False)
  return TfdsSource(train), TfdsSource(evaluation)


def transforms(path: str, size: tuple[int, int]) -> tuple[Callable, Callable]:
  if path == "before":
    return input_data.ReferenceTrainTransform(size), input_data.ReferenceEvalTransform(size)
  return preprocess.TrainTransform("inception", size), preprocess.EvalTransform("inception", size)


def time_inline(source, transform, split: str, seconds: float) -> dict[str, float]:
  """One core: records transformed one after another for about ``seconds``."""
  rng = np.random.default_rng(0)
  count, start = 0, time.perf_counter()
  while True:
    record = source[count % len(source)]
    if split == "train":
      transform(record, rng)
    else:
      transform(record)
    count += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds and count >= len(source):
      return {"img_per_s": count / elapsed, "images": count, "startup_s": 0.0}


def time_batches(make_iterator: Callable[[], Iterator], batch: int, seconds: float,
                 warmup: int = 1, max_batches: int | None = None) -> dict[str, float]:
  """Batches after the first ``warmup`` for about ``seconds`` (or until ``max_batches``)."""
  start = time.perf_counter()
  iterator = make_iterator()
  try:
    for _ in range(warmup):
      next(iterator)
    startup = time.perf_counter() - start
    count, start = 0, time.perf_counter()
    for _ in iterator:
      count += 1
      if time.perf_counter() - start >= seconds or (max_batches and count >= max_batches):
        break
    elapsed = time.perf_counter() - start
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()
  return {"img_per_s": count * batch / elapsed, "images": count * batch,
          "startup_s": startup}


def before_train_iterator(source, transform, batch: int, threads: int) -> Iterator:
  """The pipeline as it was: grain threads over the reference transform."""
  import grain
  dataset = (grain.MapDataset.source(source).seed(0).shuffle().repeat().random_map(transform)
             .batch(batch, drop_remainder=True))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                        prefetch_buffer_size=2 * threads)))


def run(num_images: int = 512, batch: int = 32, image_size: int = 224, seconds: float = 10.0,
        threads: tuple[int, ...] = (1, 2), workers: tuple[int, ...] = (1, 2),
        sources: tuple[str, ...] = ("tfds", "npz"),
        sizes: tuple[tuple[int, int], ...] = input_data.IMAGENET_SIZES,
        name: str = "bench_input", out_dir: str = common.RESULTS_DIR) -> list[dict[str, Any]]:
  size = (image_size, image_size)
  cores = usable_cores()
  rows = []

  def add(row, measured, parallel):
    row.update(measured)
    row["per_core"] = row["img_per_s"] / max(1, min(parallel, cores))
    row["ms_per_img"] = 1e3 / row["img_per_s"]
    rows.append(row)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
          flush=True)

  with tempfile.TemporaryDirectory() as data_dir:
    splits = prepare_sources(data_dir, num_images, sizes)
    for source_name in sources:
      after = splits[source_name]
      before_sources = {"tfds": splits["tfds_decoded"],
                        "npz": (after.train, after.eval)}[source_name]
      for split in ("train", "eval"):
        for path in ("before", "after"):
          train_fn, eval_fn = transforms(path, size)
          source = (before_sources if path == "before" else (after.train, after.eval))
          source = source[0] if split == "train" else source[1]
          add({"source": source_name, "split": split, "path": path, "mode": "inline",
               "workers": 0, "threads": 1},
              time_inline(source, train_fn if split == "train" else eval_fn, split, seconds), 1)
      for count in threads:
        add({"source": source_name, "split": "train", "path": "before", "mode": "threads",
             "workers": 0, "threads": count},
            time_batches(lambda: before_train_iterator(before_sources[0], transforms(
                "before", size)[0], batch, count), batch, seconds), count)
      for mode, counts in (("threads", threads), ("processes", workers)):
        for count in counts:
          pipeline = InputPipeline(
              after, global_batch_size=batch, eval_global_batch_size=batch, image_size=size,
              augment="inception", seed=0, num_threads=count if mode == "threads" else 1,
              prefetch=2 * count, num_workers=count if mode == "processes" else 0)
          row = {"source": source_name, "path": "after", "mode": mode,
                 "workers": pipeline.num_workers, "threads": pipeline.num_threads}
          warmup = max(1, pipeline.num_workers)  # every worker has started
          add({**row, "split": "train"},
              time_batches(pipeline.train_iterator, batch, seconds, warmup), count)
          add({**row, "split": "eval"},
              time_batches(pipeline.eval_batches, batch, seconds, warmup,
                           max_batches=pipeline.num_eval_batches - warmup), count)
  env = {**common.environment(), "usable_cores": cores,
         "jpeg_sizes": [f"{h}x{w}" for h, w in sizes]}
  decode_table = reduced_decode_share(sizes, image_size)
  common.save_results(name, rows, COLUMNS, env, out_dir,
                      extra={"ratios": ratios(rows), "reduced_decode": decode_table})
  print(ratios(rows))
  print(common.markdown_table(decode_table, list(decode_table[0])))
  return rows


def reduced_decode_share(sizes, image_size: int, samples: int = 20_000) -> list[dict]:
  """Per JPEG size: the share of Inception crops decoded at reduced DCT scale, the mean
  fraction of pixels decoded, and the eval crop's scale divisor (counts, not timings)."""
  rng = np.random.default_rng(0)
  out = (image_size, image_size)
  table = []
  for height, width in dict.fromkeys(sizes):
    scales = np.array([preprocess.dct_scale(*preprocess.inception_crop_box(
        height, width, rng)[2:], out) for _ in range(samples)])
    table.append({"jpeg": f"{height}x{width}", "output": image_size,
                  "train_reduced_share": float((scales > 1).mean()),
                  "train_pixels_decoded": float(np.mean(1.0 / scales ** 2)),
                  "eval_divisor": preprocess.dct_scale(
                      *preprocess.center_crop_box(height, width)[2:], out)})
  return table


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
  """The headline comparisons: after/before per core, and 2 worker processes over 1."""
  def rate(**match):
    found = [r["img_per_s"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else float("nan")
  result = {}
  for source in ("tfds", "npz"):
    for split in ("train", "eval"):
      result[f"{source}_{split}_after_over_before_per_core"] = (
          rate(source=source, split=split, mode="inline", path="after")
          / rate(source=source, split=split, mode="inline", path="before"))
      result[f"{source}_{split}_2_workers_over_1"] = (
          rate(source=source, split=split, mode="processes", workers=2)
          / rate(source=source, split=split, mode="processes", workers=1))
  return {key: value for key, value in result.items() if np.isfinite(value)}


def main(argv=None):
  parser = common.argument_parser(__doc__, "bench_input")
  parser.add_argument("--images", type=int, default=512, help="JPEGs in each split")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--seconds", type=float, default=10.0, help="timed per row (about)")
  parser.add_argument("--threads", default="1,2", help="grain thread counts to time")
  parser.add_argument("--workers", default="1,2", help="worker process counts to time")
  parser.add_argument("--sources", default="tfds,npz")
  parser.add_argument("--sizes", default=",".join(f"{h}x{w}" for h, w in
                                                  input_data.IMAGENET_SIZES),
                      help="JPEG sizes HxW, cycled (the npz holds the first size only)")
  args = parser.parse_args(argv)
  as_ints = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
  sizes = tuple(tuple(int(x) for x in size.split("x")) for size in args.sizes.split(","))
  return run(args.images, args.batch, args.image_size, args.seconds, as_ints(args.threads),
             as_ints(args.workers), tuple(args.sources.split(",")), sizes, args.name,
             args.out_dir)


if __name__ == "__main__":
  main()
