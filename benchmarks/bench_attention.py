"""Speed and compiled memory of 2D multi-head attention, per implementation.

Methods (all compute ``softmax(QKᵀ [+ S_H + S_W]) V`` with a float32 softmax):

* ``plain``  — XLA, no relative logits (the lower bound for the XLA path);
* ``gather`` — XLA, relative logits in the gather form (``aa_flax.attention``);
* ``skew``   — XLA, relative logits in the paper's rel_to_abs (skew) form;
* ``naive``  — XLA, an explicit ``[HW, HW, d]`` table of summed embeddings contracted with q
  (what the paper's memory-efficient form avoids); only up to ``--naive-max-hw`` positions;
* ``fused``  — ``attention_impl="pallas"``, the fused Triton kernel
  (``aa_flax.kernels.relative_attention``); compiled on GPU, Pallas *interpret mode* on CPU,
  where its times say nothing about the GPU kernel;
* ``fused_plain`` — the fused kernel without relative tables;
* ``cudnn``  — relative attention as plain attention over the augmented depth ``d + H + W``,
  run by cuDNN flash attention (``aa_flax.kernels.augmented_attention``); where cuDNN does
  not apply (CPU, float32) it is the ``gather`` path and is labelled ``cudnn-fallback``;
* ``pallas_tpu`` — the augmented depth on jax's Pallas TPU flash attention
  (``aa_flax.kernels.tpu_attention``); compiled on TPU, TPU interpret mode on CPU.

Suites:

* ``sizes``: the paper's feature sizes (default 7, 14, 28, 56) with N_h = 8 and the depths of
  the AA-ResNet-50 layer at that size (κ = 0.2, υ = 0.1, d_k^h ≥ 20: d_k^h = 20 everywhere).
* ``aa_resnet50``: AA-ResNet-50's 13 augmented layers at 224 px (4 × 14×14 after the 28×28
  stage's pooling, 6 × 14×14, 3 × 7×7), timed per distinct layer and summed.
* ``curve``: any square sizes with the depths of the 28×28 layer (d_k^h = 20, d_v^h = 2), for
  memory-against-HW curves (``--sizes 8,16,32,64 --memory-only``).

For each case: forward time, forward+backward time (gradients of q, k, v and the tables), and
the compiled temporary / peak memory of both (``compiled.memory_analysis()``); ``--batch``
takes a list. With several sizes it also reports how each method's forward+backward temporary
memory grows with HW (the exponent e in memory ∝ HW^e between consecutive sizes).

``--interleave`` compiles a case's methods first, then times them in alternation for ``--reps``
rounds and counts the rounds each was fastest in: how the default relative form was chosen
(``--methods gather,skew --interleave --reps 20``).

Example (CPU, compiled memory only, the tables in docs/PERFORMANCE.md):
  python -m benchmarks.bench_attention --sizes 14,28,56 --batch 2,8 --dtypes float32 \
      --methods plain,gather,fused,cudnn,pallas_tpu --memory-only --name memory_paths_cpu
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from aa_flax import attention, layers
from aa_flax.kernels import augmented_attention, relative_attention, tpu_attention
from benchmarks import common

METHODS = ("plain", "gather", "skew", "naive", "fused", "fused_plain", "cudnn", "pallas_tpu")
SUITES = ("sizes", "aa_resnet50", "curve")
# Width of the augmented 3x3 conv of AA-ResNet-50 at each feature size (224 px input).
RESNET50_FILTERS = {56: 64, 28: 128, 14: 256, 7: 512}
COLUMNS = ("case", "method", "dtype", "batch", "HxW", "d_k^h", "d_v^h", "fwd_ms", "fwd_bwd_ms",
           "fwd_temp_mib", "fwd_bwd_temp_mib", "fwd_bwd_peak_mib", "compile_s")


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention shape: ``count`` identical layers of ``[B, N, H, W, d]`` attention."""
  name: str
  height: int
  width: int
  heads: int
  key_depth: int  # per head
  value_depth: int  # per head
  count: int = 1


def resnet50_case(name: str, size: int, filters: int, count: int = 1, heads: int = 8) -> Case:
  """An AA-ResNet-50 layer (κ=0.2, υ=0.1) with ``filters`` outputs attending over
  ``size x size``; depths resolved exactly as AAConv resolves them."""
  depths = layers.attention_depths(filters, 0.2, 0.1, heads)
  return Case(name, size, size, heads, depths.key_per_head, depths.value_per_head, count)


def suite_cases(suite: str, sizes) -> list[Case]:
  if suite == "sizes":
    return [resnet50_case(f"{s}x{s}", s, RESNET50_FILTERS[s]) for s in sizes]
  if suite == "aa_resnet50":
    # 224 px: stage 2 (28x28, 4 blocks, 128 filters) pools its attention input to 14x14;
    # stage 3 (14x14, 6 blocks, 256 filters); stage 4 (7x7, 3 blocks, 512 filters).
    return [resnet50_case("stage2_pooled", 14, 128, count=4),
            resnet50_case("stage3", 14, 256, count=6),
            resnet50_case("stage4", 7, 512, count=3)]
  if suite == "curve":
    return [resnet50_case(f"{s}x{s}", s, RESNET50_FILTERS[28]) for s in sizes]
  raise ValueError(f"suite {suite!r} is not one of {SUITES}")


def naive_relative_attention(q, k, v, rel_h, rel_w):
  """Relative attention through an explicit ``[HW, HW, d]`` embedding table.

  q, k ``[B, N, H, W, d]``, v ``[B, N, H, W, d_v]``; tables ``[2H-1, d]``, ``[2W-1, d]``.
  Embedding of (query i, key j) = ``rel_h[y_j - y_i + H - 1] + rel_w[x_j - x_i + W - 1]``.
  """
  batch, heads, height, width, depth = q.shape
  length = height * width
  ys, xs = np.divmod(np.arange(length), width)
  emb = (rel_h[ys[None, :] - ys[:, None] + height - 1]
         + rel_w[xs[None, :] - xs[:, None] + width - 1])  # [HW, HW, d]
  qf = q.reshape(batch, heads, length, depth)
  kf = k.reshape(batch, heads, length, depth)
  logits = (jnp.einsum("bnqd,bnkd->bnqk", qf, kf, preferred_element_type=jnp.float32)
            + jnp.einsum("bnqd,qkd->bnqk", qf, emb, preferred_element_type=jnp.float32))
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bnqk,bnkd->bnqd", weights, v.reshape(batch, heads, length, -1),
                   preferred_element_type=jnp.float32)
  return out.astype(v.dtype).reshape(batch, heads, height, width, -1)


def attention_function(method: str) -> tuple[Callable, bool]:
  """``(fn(q, k, v, rel_h, rel_w) -> out, uses_tables)`` for a method name."""
  if method == "plain":
    return lambda q, k, v, rh, rw: attention.multihead_attention_2d(q, k, v), False
  if method in ("gather", "skew"):
    return (lambda q, k, v, rh, rw: attention.multihead_attention_2d(
        q, k, v, rh, rw, relative_method=method)), True
  if method == "naive":
    return naive_relative_attention, True
  if method == "fused":
    return relative_attention.multihead_attention_2d, True
  if method == "fused_plain":
    return lambda q, k, v, rh, rw: relative_attention.multihead_attention_2d(q, k, v), False
  if method == "cudnn":
    return augmented_attention.multihead_attention_2d, True
  if method == "pallas_tpu":
    return tpu_attention.multihead_attention_2d, True
  raise ValueError(f"method {method!r} is not one of {METHODS}")


def make_inputs(case: Case, batch: int, dtype, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 6)
  shape = (batch, case.heads, case.height, case.width)
  q = jax.random.normal(keys[0], shape + (case.key_depth,), dtype) * case.key_depth ** -0.5
  k = jax.random.normal(keys[1], shape + (case.key_depth,), dtype)
  v = jax.random.normal(keys[2], shape + (case.value_depth,), dtype)
  rel_h = jax.random.normal(keys[3], (2 * case.height - 1, case.key_depth), dtype)
  rel_w = jax.random.normal(keys[4], (2 * case.width - 1, case.key_depth), dtype)
  cotangent = jax.random.normal(keys[5], shape + (case.value_depth,), jnp.float32)
  return (q, k, v, rel_h, rel_w), cotangent


def compile_method(case: Case, method: str, batch: int, dtype):
  """Compiles one (case, method, dtype): ``(row without times, forward(), train())``, where
  the two calls run the compiled forward / forward+backward and block on the result."""
  fn, uses_tables = attention_function(method)
  args, cotangent = make_inputs(case, batch, dtype)
  argnums = (0, 1, 2, 3, 4) if uses_tables else (0, 1, 2)

  def loss(*a):
    return jnp.sum(fn(*a).astype(jnp.float32) * cotangent)

  start = time.perf_counter()
  forward = jax.jit(fn).lower(*args).compile()
  train = jax.jit(jax.value_and_grad(loss, argnums)).lower(*args).compile()
  compile_s = time.perf_counter() - start
  fwd_mem, train_mem = common.compiled_memory(forward), common.compiled_memory(train)
  label = method
  if ((method.startswith("fused") and relative_attention.resolve_interpret(None))
      or (method == "pallas_tpu" and tpu_attention.resolve_interpret(None))):
    label += "-interpret"
  depth = case.key_depth + case.height + case.width
  if method == "cudnn" and not augmented_attention.cudnn_applies(dtype, depth):
    label += "-fallback"
  row = {
      "case": case.name, "method": label,
      "dtype": jnp.dtype(dtype).name, "batch": batch, "HxW": f"{case.height}x{case.width}",
      "HW": case.height * case.width,
      "d_k^h": case.key_depth, "d_v^h": case.value_depth, "count": case.count,
      "fwd_temp_mib": fwd_mem["temp_mib"], "fwd_bwd_temp_mib": train_mem["temp_mib"],
      "fwd_bwd_peak_mib": train_mem["peak_mib"], "compile_s": compile_s,
      "fwd_ms": None, "fwd_bwd_ms": None,
  }
  return (row, lambda: jax.block_until_ready(forward(*args)),
          lambda: jax.block_until_ready(train(*args)))


def measure(case: Case, method: str, batch: int, dtype, reps: int,
            time_it: bool = True) -> dict:
  """Times and memory of one (case, method, dtype); times in ms, memory in MiB."""
  row, forward, train = compile_method(case, method, batch, dtype)
  if time_it:
    row["fwd_ms"] = 1e3 * common.median_seconds(forward, reps)
    row["fwd_bwd_ms"] = 1e3 * common.median_seconds(train, reps)
  return row


def interleaved(case: Case, methods, batch: int, dtype, rounds: int) -> tuple[list[dict], dict]:
  """Times ``methods`` on one case in alternation (method 1, 2, ..., 1, 2, ... for ``rounds``
  rounds, after one warm-up call each), so load from other processes hits them alike.

  Returns the rows (median times) and ``{method: rounds in which its fwd+bwd was fastest}``.
  """
  compiled = [compile_method(case, method, batch, dtype) for method in methods]
  times = {row["method"]: ([], []) for row, _, _ in compiled}
  for _, forward, train in compiled:
    forward(), train()
  for _ in range(rounds):
    for row, forward, train in compiled:
      for call, record in zip((forward, train), times[row["method"]]):
        start = time.perf_counter()
        call()
        record.append(time.perf_counter() - start)
  fastest = {method: 0 for method in times}
  for index in range(rounds):
    fastest[min(times, key=lambda m: times[m][1][index])] += 1
  rows = []
  for row, _, _ in compiled:
    forward_s, train_s = times[row["method"]]
    rows.append({**row, "fwd_ms": 1e3 * statistics.median(forward_s),
                 "fwd_bwd_ms": 1e3 * statistics.median(train_s)})
  return rows, fastest


def relative_overheads(rows: list[dict]) -> list[dict]:
  """Per (case, dtype, batch): each method's fwd+bwd temp memory and time / plain's."""
  plain = {(r["case"], r["dtype"], r["batch"]): r for r in rows if r["method"] == "plain"}
  out = []
  for r in rows:
    base = plain.get((r["case"], r["dtype"], r["batch"]))
    if base is None or r["method"] == "plain":
      continue
    ratio = {"case": r["case"], "dtype": r["dtype"], "batch": r["batch"], "method": r["method"],
             "temp_vs_plain": r["fwd_bwd_temp_mib"] / max(base["fwd_bwd_temp_mib"], 1e-9)}
    if r["fwd_bwd_ms"] is not None and base["fwd_bwd_ms"]:
      ratio["time_vs_plain"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    out.append(ratio)
  return out


def memory_growth(rows: list[dict]) -> list[dict]:
  """Per (method, dtype, batch): the exponent e of fwd+bwd temp memory ∝ HW^e between
  consecutive sizes."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["method"], r["dtype"], r["batch"]), []).append(r)
  out = []
  for (method, dtype, batch), group in groups.items():
    group = sorted(group, key=lambda r: r["HW"])
    for small, large in zip(group, group[1:]):
      if small["fwd_bwd_temp_mib"] > 0 and large["HW"] > small["HW"]:
        out.append({"method": method, "dtype": dtype, "batch": batch,
                    "from": small["HxW"], "to": large["HxW"],
                    "exponent": math.log(large["fwd_bwd_temp_mib"] / small["fwd_bwd_temp_mib"])
                                / math.log(large["HW"] / small["HW"])})
  return out


def suite_totals(rows: list[dict]) -> list[dict]:
  """Sum over layers (count x per-layer value) per (method, dtype)."""
  totals: dict[tuple, dict] = {}
  for r in rows:
    t = totals.setdefault((r["method"], r["dtype"]), {
        "method": r["method"], "dtype": r["dtype"], "layers": 0, "fwd_ms": 0.0,
        "fwd_bwd_ms": 0.0})
    t["layers"] += r["count"]
    for key in ("fwd_ms", "fwd_bwd_ms"):
      t[key] = None if r[key] is None or t[key] is None else t[key] + r["count"] * r[key]
  return list(totals.values())


def run(suite: str = "sizes", sizes=(7, 14, 28, 56), batches=(8,),
        dtypes=("float32", "bfloat16"), methods=METHODS, naive_max_hw: int = 196,
        fused_max_hw: Optional[int] = None, reps: int = 5, time_it: bool = True,
        name: str = "bench_attention", out_dir: str = common.RESULTS_DIR,
        interleave: bool = False) -> list[dict]:
  """Measures every (batch, case, dtype, method); saves and prints; returns the rows.

  ``interleave``: time each case's methods in alternation for ``reps`` rounds (see
  :func:`interleaved`), for comparing close methods on a loaded machine.
  """
  env = common.environment()
  rows, failures, fastest_rounds = [], [], []

  def attempt(what: dict, measure_fn):
    try:
      return measure_fn()
    except Exception as e:  # pylint: disable=broad-except
      # One failing method (out of memory, a backend that rejects a shape) must not lose the
      # others' numbers: record it and go on.
      failures.append({**what, "error": f"{type(e).__name__}: {str(e)[:300]}"})
      print("FAILED", failures[-1], flush=True)
      return None

  for batch in batches:
    for case in suite_cases(suite, sizes):
      length = case.height * case.width
      for dtype in dtypes:
        selected = [m for m in methods
                    if not (m == "naive" and length > naive_max_hw)
                    and not (m.startswith("fused") and fused_max_hw is not None
                             and length > fused_max_hw)]
        what = {"case": case.name, "dtype": dtype, "batch": batch}
        if interleave and time_it:
          result = attempt({**what, "method": ",".join(selected)}, lambda: interleaved(
              case, selected, batch, jnp.dtype(dtype), reps))
          if result is not None:
            rows.extend(result[0])
            fastest_rounds.append({**what, "rounds": reps, **result[1]})
          continue
        for method in selected:
          row = attempt({**what, "method": method}, lambda: measure(
              case, method, batch, jnp.dtype(dtype), reps, time_it))
          if row is not None:
            rows.append(row)
            print({k: row[k] for k in ("case", "method", "dtype", "batch", "fwd_ms",
                                       "fwd_bwd_ms", "fwd_bwd_temp_mib")}, flush=True)
  extra = {"relative_vs_plain": relative_overheads(rows), "memory_growth": memory_growth(rows),
           "failures": failures, "fastest_rounds": fastest_rounds}
  if suite == "aa_resnet50":
    extra["totals"] = suite_totals(rows)
  common.save_results(name, rows, COLUMNS, env, out_dir, extra)
  print("\nrelative vs plain (fwd+bwd):")
  print(common.markdown_table(extra["relative_vs_plain"], ("case", "dtype", "batch", "method",
                                                           "temp_vs_plain", "time_vs_plain")))
  if extra["memory_growth"]:
    print("\nfwd+bwd temp memory ∝ HW^exponent:")
    print(common.markdown_table(extra["memory_growth"],
                                ("method", "dtype", "batch", "from", "to", "exponent")))
  if fastest_rounds:
    print("\nrounds in which each method's fwd+bwd was the fastest:")
    print(common.markdown_table(fastest_rounds, list(fastest_rounds[0])))
  if failures:
    print("\nfailed:")
    print(common.markdown_table(failures, ("case", "method", "dtype", "error")))
  if "totals" in extra:
    print("\nsum over AA-ResNet-50's augmented layers:")
    print(common.markdown_table(extra["totals"],
                                ("method", "dtype", "layers", "fwd_ms", "fwd_bwd_ms")))
  return rows


def main(argv=None):
  parser = common.argument_parser(__doc__, "bench_attention")
  parser.add_argument("--suite", default="sizes", choices=SUITES)
  parser.add_argument("--sizes", default="7,14,28,56",
                      help="square feature sizes; the 'sizes' suite takes "
                           f"{sorted(RESNET50_FILTERS)}")
  parser.add_argument("--batch", default="8", help="comma-separated batch sizes")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--naive-max-hw", type=int, default=196)
  parser.add_argument("--fused-max-hw", type=int, default=None)
  parser.add_argument("--reps", type=int, default=5, help="timed calls (rounds with --interleave)")
  parser.add_argument("--memory-only", action="store_true", help="compile, do not time")
  parser.add_argument("--interleave", action="store_true",
                      help="time each case's methods in alternation (fair on a loaded machine)")
  args = parser.parse_args(argv)
  sizes = tuple(int(s) for s in args.sizes.split(","))
  bad = [s for s in sizes if s not in RESNET50_FILTERS]
  if bad and args.suite == "sizes":
    parser.error(f"--sizes {bad} not in {sorted(RESNET50_FILTERS)}")
  methods = tuple(args.methods.split(","))
  bad = [m for m in methods if m not in METHODS]
  if bad:
    parser.error(f"--methods {bad} not in {METHODS}")
  batches = tuple(int(b) for b in args.batch.split(","))
  run(args.suite, sizes, batches, tuple(args.dtypes.split(",")), methods,
      args.naive_max_hw, args.fused_max_hw, args.reps, not args.memory_only, args.name,
      args.out_dir, args.interleave)


if __name__ == "__main__":
  main()
