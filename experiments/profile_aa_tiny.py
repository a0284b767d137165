"""Where the train step of ``aa_resnet_tiny`` spends its time compared with ``resnet_tiny``.

  python -m experiments.profile_aa_tiny [--batch 128] [--dtypes float32,bfloat16] [--rounds 7]

For each dtype, both models (32x32 images, width 16, 10 classes) and the train step
``train.py`` runs, as ``benchmarks.bench_train`` times it:

* XLA's cost analysis of the compiled step: GFLOPs and GB accessed (independent of load);
* the attention tensors ``[B, N_h, HW, HW]`` of every AAConv and their size, and how many
  arrays of the largest one's shape the compiled step materialises (each is written to memory
  and read back: the passes that make attention memory-bound on CPU);
* per-op times from a ``jax.profiler`` trace of 3 steps, summed by what each XLA op computes
  (each AAConv's attention core, the rest of its attention branch, everything else), as
  shares of all op time (shares move little with load; absolute times do);
* step times, interleaved model by model for ``--rounds`` rounds (median and min), their
  ratio to ``resnet_tiny`` and the host's load average: run it on an idle machine.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.bench_train import synthetic_training

MODELS = ("resnet_tiny", "aa_resnet_tiny")
# What an XLA op computes: an AAConv's attention core or the rest of its attention branch (each
# named after its block, e.g. "stage2_block1 " + CORE), or anything else.
CORE = "attention core (logits, softmax, AV)"
BRANCH = "attention branch (pool, qkv, output conv)"
OTHER = "everything else (convs, BN, head, optimizer)"
COLUMNS = ("dtype", "model", "gflops", "gb_accessed", "attention_mib", "full_size_arrays",
           "median_ms", "min_ms", "ratio_median", "ratio_min", "attention_core_share",
           "attention_branch_share")


def build(model_name: str, dtype, batch: int, image_size: int):
  """The model, its compiled train step and the step's arguments ``(state, batch)``.

  The step is ``train.py``'s (``benchmarks.bench_train.synthetic_training``) on one device,
  jitted without donation so that the same arguments can be replayed.
  """
  setup = synthetic_training(model_name, batch, image_size, dtype, num_classes=10,
                             overrides={"width": 16}, devices=jax.local_devices()[:1])
  args = (setup.state, setup.batch)
  return setup.model, jax.jit(setup.train_step).lower(*args).compile(), args


def attention_tensors(model, args) -> dict[str, tuple[tuple[int, ...], float]]:
  """``{layer: (shape of its [B, N_h, HW, HW] weights, MiB in float32)}``."""
  state, batch = args
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  images = jax.ShapeDtypeStruct(batch["image"].shape, jnp.float32)
  shapes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False,
                                                   mutable=["intermediates"])[1],
                          variables, images)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {"/".join(k.key for k in path[1:-1]): (leaf.shape, 4 * leaf.size / common.MIB)
          for path, leaf in flat if path[-2].key == "attention_weights"}


def materialised_arrays(compiled, shape: tuple[int, ...]) -> int:
  """How many arrays of ``shape`` the compiled program's entry computation produces."""
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):]
  pattern = re.compile(r" = \w+\[" + ",".join(map(str, shape)) + r"\]")
  return sum(1 for line in entry[:entry.index("\n}")].splitlines() if pattern.search(line))


def _op_categories(hlo_text: str) -> dict[str, str]:
  """XLA op name -> what it computes, from the ``op_name`` metadata (of the op or, for a
  fusion without it, of the first fused instruction that has it)."""
  metadata = {}
  computations = {}
  current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^\s*%?([\w.\-]+) .*\{\s*$", line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      continue
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if not match:
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    metadata[match.group(1)] = (op_name.group(1) if op_name else "",
                                calls.group(1) if calls else None)
    if current and op_name:
      computations.setdefault(current, op_name.group(1))

  def category(name: str) -> str:
    op_name, calls = metadata.get(name, ("", None))
    op_name = op_name or computations.get(calls, "")
    block = re.search(r"(stage\d+_block\d+)", op_name)
    if block and "._attend" in op_name:
      return f"{block.group(1)} {CORE}"
    if block and "._attention_branch" in op_name:
      return f"{block.group(1)} {BRANCH}"
    return OTHER

  return {name: category(name) for name in metadata}


def op_time_shares(compiled, args, steps: int = 3) -> dict[str, float]:
  """Share of summed XLA op time per category over ``steps`` profiled steps (``{}`` if the
  trace holds no per-op events on this backend)."""
  categories = _op_categories(compiled.as_text())
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      for _ in range(steps):
        jax.block_until_ready(compiled(*args))
    paths = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
      return {}
    with gzip.open(paths[0]) as handle:
      events = json.load(handle)["traceEvents"]
  totals: dict[str, float] = collections.defaultdict(float)
  for event in events:
    if event.get("ph") == "X" and event.get("name") in categories:
      totals[categories[event["name"]]] += event["dur"]
  total = sum(totals.values())
  return {key: value / total for key, value in sorted(totals.items())} if total else {}


def interleaved_times(entries: dict[str, Any], rounds: int) -> dict[str, list[float]]:
  """Seconds per step of each compiled step, one call per entry per round."""
  times = {name: [] for name in entries}
  for compiled, args in entries.values():
    jax.block_until_ready(compiled(*args))
  for _ in range(rounds):
    for name, (compiled, args) in entries.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[name].append(time.perf_counter() - start)
  return times


def main(argv=None):
  parser = common.argument_parser(__doc__, "profile_aa_tiny")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args(argv)
  env = common.environment()
  env["load_average_start"] = os.getloadavg()
  rows, shares = [], {}
  for dtype_name in args.dtypes.split(","):
    dtype = jnp.dtype(dtype_name)
    entries, models = {}, {}
    for name in MODELS:
      models[name], compiled, step_args = build(name, dtype, args.batch, args.image_size)
      entries[name] = (compiled, step_args)
    times = interleaved_times(entries, args.rounds)
    base = times[MODELS[0]]
    for name, (compiled, step_args) in entries.items():
      cost = compiled.cost_analysis()
      tensors = attention_tensors(models[name], step_args)
      shares[f"{dtype_name} {name}"] = op_time_shares(compiled, step_args)
      core = sum(v for k, v in shares[f"{dtype_name} {name}"].items() if k.endswith(CORE))
      branch = sum(v for k, v in shares[f"{dtype_name} {name}"].items() if k.endswith(BRANCH))
      largest = max((shape for shape, _ in tensors.values()), default=None, key=math.prod)
      rows.append({
          "dtype": dtype_name, "model": name, "gflops": cost["flops"] / 1e9,
          "gb_accessed": cost["bytes accessed"] / 1e9,
          "attention_mib": sum(mib for _, mib in tensors.values()),
          "full_size_arrays": materialised_arrays(compiled, largest) if largest else 0,
          "median_ms": 1e3 * statistics.median(times[name]), "min_ms": 1e3 * min(times[name]),
          "ratio_median": statistics.median(times[name]) / statistics.median(base),
          "ratio_min": min(times[name]) / min(base),
          "attention_core_share": core, "attention_branch_share": branch,
      })
      print(rows[-1], {k: s for k, s in tensors.items()}, flush=True)
  env["load_average_end"] = os.getloadavg()
  for key, value in shares.items():
    print(f"\nop-time shares, {key}:")
    for category, share in value.items():
      print(f"  {100 * share:5.1f}%  {category}")
  common.save_results(args.name, rows, COLUMNS, env, args.out_dir, extra={"shares": shares})
  return rows, shares


if __name__ == "__main__":
  main()
