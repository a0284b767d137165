"""Gather vs skew relative logits, timed interleaved (fair on a shared, noisy machine).

Both forms are compiled once per case (forward+backward of the XLA attention path, gradients of
q, k, v and the tables); the timed calls then alternate gather, skew, gather, ... for
``--rounds`` rounds, so load from other processes hits both alike. Reports the median of each,
their ratio, and in how many rounds gather was the faster one.

  python -m benchmarks.compare_relative_forms --batch 8 --rounds 30 --name forms_cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from aa_flax import attention
from benchmarks import bench_attention, common

COLUMNS = ("case", "HxW", "dtype", "batch", "gather_ms", "skew_ms", "skew_over_gather",
           "gather_faster_rounds")


def compare(case: bench_attention.Case, batch: int, dtype, rounds: int) -> dict:
  """Interleaved fwd+bwd timing of the two relative forms for one case."""
  args, cotangent = bench_attention.make_inputs(case, batch, dtype)

  def train_fn(method):
    def loss(*a):
      out = attention.multihead_attention_2d(*a, relative_method=method)
      return jnp.sum(out.astype(jnp.float32) * cotangent)
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4))).lower(*args).compile()
    return lambda: jax.block_until_ready(compiled(*args))

  fns = {"gather": train_fn("gather"), "skew": train_fn("skew")}
  times = {name: [] for name in fns}
  for fn in fns.values():  # warm-up
    fn()
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  gather_ms = 1e3 * statistics.median(times["gather"])
  skew_ms = 1e3 * statistics.median(times["skew"])
  return {"case": case.name, "HxW": f"{case.height}x{case.width}",
          "dtype": jnp.dtype(dtype).name, "batch": batch, "gather_ms": gather_ms,
          "skew_ms": skew_ms, "skew_over_gather": skew_ms / gather_ms,
          "gather_faster_rounds": f"{sum(g < s for g, s in zip(times['gather'], times['skew']))}"
                                  f"/{rounds}"}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="7,14,28", help="square sizes (AA-ResNet-50 layers)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--name", default="compare_relative_forms")
  parser.add_argument("--out-dir", default=common.RESULTS_DIR)
  args = parser.parse_args(argv)
  env = common.environment()
  rows = []
  for size in (int(s) for s in args.sizes.split(",")):
    case = bench_attention.resnet50_case(f"{size}x{size}", size,
                                         bench_attention.RESNET50_FILTERS[size])
    for dtype in args.dtypes.split(","):
      rows.append(compare(case, args.batch, jnp.dtype(dtype), args.rounds))
      print(rows[-1], flush=True)
  common.save_results(args.name, rows, COLUMNS, env, args.out_dir)
  return rows


if __name__ == "__main__":
  main()
