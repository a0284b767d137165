"""One-GPU performance check, in one run of under 8 minutes (needs only jax, flax, optax, numpy).

Every train measurement is ``benchmarks.bench_train``: the train step ``train.py`` runs
(``aa_flax.trainer.make_train_step`` with its input normalisation and finiteness checks,
jitted with the run's donation and shardings) on a synthetic batch already on the device, so
AA-ResNet-50 / ResNet-50 below is the ratio of that step's img/s. Steps, in this order, each in
its own process with its own time limit, so a slow or out-of-memory step can neither starve
nor take down the others:

1. ``plain``: ResNet-50 train img/s (bf16, batch 256, 224 px): the reference;
2. ``aa_xla``: AA-ResNet-50 with ``attention_impl="xla"``, same settings;
3. ``aa_cudnn``: with ``"cudnn"`` (cuDNN flash attention over the augmented depth);
4. ``aa_pallas``: with ``"pallas"`` (the fused Triton kernel);
5. ``attention_memory``: compiled forward+backward temporary memory of one attention layer at
   28x28 and 56x56 (batch 8, bf16), plain attention and each relative path;
6. ``aa56``: AA-ResNet-50 augmented from the 56x56 stage on without pooling, on the fastest
   path of steps 2-4: batch 128, then 256 if 128 trains, else 64 and 32 until one trains.

It writes ``gpu_check.md``/``.json`` (under ``benchmarks/results/gpu_check/``): one table with
the img/s of each run, AA-ResNet-50 / ResNet-50 per path, the device peak memory of each run,
relative / plain attention memory at 28x28 and 56x56 per path, and the largest batch at which
the 56x56 unpooled model trained. The targets it reports against: on the fastest path
AA-ResNet-50 trains at >= 0.85x the img/s of ResNet-50; relative attention needs <= 1.3x the
memory of plain attention; the 56x56 unpooled model trains at batch 128.

  python -m benchmarks.gpu_check                  # on the GPU machine
  python -m benchmarks.gpu_check --only plain,aa56  # a subset (e.g. what a time limit cut)
  python -m benchmarks.gpu_check --limit aa56=300 --only aa56  # another limit for a step
  python -m benchmarks.gpu_check --smoke          # on CPU: tiny sizes, plumbing only

Compiled programs are cached in ``<out-dir>/jax_cache``, so rerunning a step skips most of its
compilation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Callable, Optional

from benchmarks import common

TARGET_AA_RATIO = 0.85
TARGET_MEMORY_RATIO = 1.3
TARGET_AA56_BATCH = 128
AA_IMPLS = ("xla", "cudnn", "pallas")
RELATIVE_METHODS = {"gather": "xla", "cudnn": "cudnn", "fused": "pallas"}  # bench -> impl
AA56 = ["--override", "attention_stages=(0,1,2,3)", "--override", "attention_pool_stages=()"]


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes and per-step time limits (seconds) of one plan."""
  train: tuple[str, ...]
  plain: tuple[str, ...]
  aa: tuple[str, ...]
  aa56: tuple[str, ...]
  aa56_batches: tuple[int, ...]  # first, then larger if it trains
  aa56_smaller: tuple[int, ...]  # tried in order if the first fails
  attention_memory: tuple[str, ...]
  memory_sizes: tuple[str, ...]
  limits: dict
  budget_s: float


FULL = Config(
    train=("--batch", "256", "--image-size", "224", "--dtype", "bfloat16", "--steps", "20",
           "--warmup", "2"),
    plain=("--models", "resnet50"),
    aa=("--models", "aa_resnet50"),
    aa56=("--models", "aa_resnet50", "--steps", "3", "--warmup", "1", *AA56),
    aa56_batches=(128, 256), aa56_smaller=(64, 32),
    attention_memory=("--suite", "sizes", "--sizes", "28,56", "--batch", "8", "--dtypes",
                      "bfloat16", "--methods", "plain,gather,fused,cudnn", "--memory-only"),
    memory_sizes=("28x28", "56x56"),
    limits={"plain": 70, "aa_xla": 75, "aa_cudnn": 75, "aa_pallas": 75,
            "attention_memory": 45, "aa56": 130},
    budget_s=470)
# Same plan on CPU: the tiny AA-ResNet (its plain twin has no augmented stage); minutes.
SMOKE = Config(
    train=("--batch", "8", "--image-size", "16", "--dtype", "float32", "--steps", "2",
           "--warmup", "1", "--num-classes", "10"),
    plain=("--models", "aa_resnet_tiny", "--override", "attention_stages=()"),
    aa=("--models", "aa_resnet_tiny"),
    aa56=("--models", "aa_resnet_tiny", "--steps", "1", "--warmup", "1", "--override",
          "attention_stages=(0,1,2)"),
    aa56_batches=(4, 8), aa56_smaller=(2,),
    attention_memory=("--suite", "curve", "--sizes", "8,16", "--batch", "1", "--dtypes",
                      "float32", "--methods", "plain,gather,fused,cudnn", "--memory-only"),
    memory_sizes=("8x8", "16x16"),
    limits={"plain": 120, "aa_xla": 120, "aa_cudnn": 120, "aa_pallas": 180,
            "attention_memory": 180, "aa56": 300},
    budget_s=1100)
STEPS = ("plain", "aa_xla", "aa_cudnn", "aa_pallas", "attention_memory", "aa56")


def _train(out_dir: str) -> list[str]:
  return [sys.executable, "-m", "benchmarks.bench_train", "--out-dir", out_dir]


def fixed_steps(config: Config, out_dir: str) -> list[tuple[str, list[str]]]:
  """``(name, argv)`` of steps 1-5, in run order (step 6 depends on their results)."""
  train = _train(out_dir) + list(config.train)
  steps = [("plain", train + list(config.plain) + ["--name", "plain"])]
  for impl in AA_IMPLS:
    steps.append((f"aa_{impl}", train + list(config.aa) + [
        "--override", f"attention_impl={impl}", "--name", f"aa_{impl}"]))
  steps.append(("attention_memory", [sys.executable, "-m", "benchmarks.bench_attention",
                                     "--out-dir", out_dir, *config.attention_memory,
                                     "--name", "attention_memory"]))
  return steps


def aa56_argv(config: Config, out_dir: str, impl: str, batch: int) -> list[str]:
  # The later --batch wins in argparse, so it overrides the shared train batch.
  return (_train(out_dir) + list(config.train) + list(config.aa56)
          + ["--batch", str(batch), "--override", f"attention_impl={impl}",
             "--name", f"aa56_b{batch}"])


def load(out_dir: str, name: str) -> Optional[dict]:
  path = os.path.join(out_dir, f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def first_row(out_dir: str, name: str) -> Optional[dict]:
  result = load(out_dir, name)
  return result["rows"][0] if result and result["rows"] else None


def fastest_impl(out_dir: str) -> Optional[str]:
  """The attention_impl whose AA-ResNet-50 run had the highest img/s (None: none ran)."""
  speeds = {impl: row["img_per_s"] for impl in AA_IMPLS
            if (row := first_row(out_dir, f"aa_{impl}"))}
  return max(speeds, key=speeds.get) if speeds else None


def largest_training_batch(config: Config, run: Callable[[str, list[str]], str], impl: str,
                           out_dir: str) -> dict:
  """Tries ``aa56_batches`` in order while they train, else ``aa56_smaller`` until one does.

  ``run(name, argv) -> status`` runs one attempt ("ok" when it trained). Returns the attempts
  and the largest batch that trained (None if none did).
  """
  attempts, largest = {}, None
  first, *larger = config.aa56_batches
  for batch in (first, *larger):
    attempts[batch] = run(f"aa56_b{batch}", aa56_argv(config, out_dir, impl, batch))
    if attempts[batch] != "ok":
      break
    largest = batch
  if largest is None:
    for batch in config.aa56_smaller:
      attempts[batch] = run(f"aa56_b{batch}", aa56_argv(config, out_dir, impl, batch))
      if attempts[batch] == "ok":
        largest = batch
        break
  return {"impl": impl, "attempts": attempts, "largest_batch": largest}


def summarise(out_dir: str, config: Config, statuses: dict, aa56: Optional[dict]) -> list[dict]:
  """The one results table: measure, value, target, status."""
  def row(measure, value, target="", status=""):
    return {"measure": measure, "value": value, "target": target, "status": status}

  plain = first_row(out_dir, "plain")
  plain_img_s = plain["img_per_s"] if plain else None
  rows = [row(f"{plain['model'] if plain else 'plain'} img/s (reference)", plain_img_s,
              status=statuses.get("plain", "not run")),
          row("  device peak MiB", plain and plain["device_peak_mib"])]
  best = fastest_impl(out_dir)
  for impl in AA_IMPLS:
    result = first_row(out_dir, f"aa_{impl}")
    name = result["model"] if result else "aa model"
    target = f">= {TARGET_AA_RATIO} on the fastest path" + (" (this one)" if impl == best else "")
    rows += [row(f"{name}, {impl}: img/s", result and result["img_per_s"],
                 status=statuses.get(f"aa_{impl}", "not run")),
             row(f"  {impl} / plain img/s",
                 result["img_per_s"] / plain_img_s if result and plain_img_s else None, target),
             row("  device peak MiB", result and result["device_peak_mib"])]
  memory = load(out_dir, "attention_memory")
  ratios = {(r["case"], r["method"].split("-")[0]): r["temp_vs_plain"]
            for r in (memory or {}).get("extra", {}).get("relative_vs_plain", [])}
  for size in config.memory_sizes:
    for method, impl in RELATIVE_METHODS.items():
      rows.append(row(f"attention fwd+bwd temp memory {size}, {impl} / plain",
                      ratios.get((size, method)), f"<= {TARGET_MEMORY_RATIO}",
                      statuses.get("attention_memory", "not run")))
  aa56 = aa56 or {}
  largest = aa56.get("largest_batch")
  at_largest = first_row(out_dir, f"aa56_b{largest}") if largest else None
  tried = ", ".join(f"{b}: {s}" for b, s in aa56.get("attempts", {}).items())
  rows += [row(f"AA from the 56x56 stage, no pooling, {aa56.get('impl', '-')}: largest batch "
               f"that trains", largest, f">= {TARGET_AA56_BATCH}",
               statuses.get("aa56", "not run") + (f" ({tried})" if tried else "")),
           row(f"  img/s at batch {largest}", at_largest and at_largest["img_per_s"]),
           row(f"  device peak MiB at batch {largest}",
               at_largest and at_largest["device_peak_mib"])]
  return rows


class StepRunner:
  """Runs step processes; each gets its own limit, and none runs past the overall budget."""

  def __init__(self, out_dir: str, budget_s: float):
    self.out_dir = out_dir
    self.deadline = time.perf_counter() + budget_s
    self.repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    self.env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(out_dir, "jax_cache"))

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def __call__(self, name: str, argv: list[str], limit_s: float) -> str:
    timeout = min(limit_s, self.left())
    if timeout <= 5:
      return "skipped: time budget spent"
    print(f"== {name} (limit {timeout:.0f} s): {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    try:
      proc = subprocess.run(argv, cwd=self.repo_root, env=self.env, timeout=timeout,
                            text=True, capture_output=True, check=False)
      output = proc.stdout + proc.stderr
      status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as e:
      output = ((e.stdout or "") + (e.stderr or "")) if isinstance(e.stdout, str) else ""
      status = f"timed out after {timeout:.0f} s"
    with open(os.path.join(self.out_dir, f"{name}.log"), "w") as f:
      f.write(output)
    tail = "\n".join(output.strip().splitlines()[-6:])
    print(f"{status} in {time.perf_counter() - start:.0f} s\n{tail}", flush=True)
    return status


def main(argv=None):
  parser = common.argument_parser(__doc__, None)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU check")
  parser.add_argument("--out-dir", default=None)
  parser.add_argument("--dry-run", action="store_true", help="print the plan only")
  parser.add_argument("--only", default=None, help=f"comma-separated steps of {STEPS}")
  parser.add_argument("--limit", action="append", default=[],
                      help="step=seconds: another time limit for a step (repeatable)")
  args = parser.parse_args(argv)
  config = SMOKE if args.smoke else FULL
  for item in args.limit:
    name, _, seconds = item.partition("=")
    if name not in STEPS or not seconds.replace(".", "", 1).isdigit():
      parser.error(f"--limit {item!r}: expected step=seconds with step one of {list(STEPS)}")
    config = dataclasses.replace(config, limits={**config.limits, name: float(seconds)},
                                 budget_s=config.budget_s + float(seconds)
                                 - config.limits[name])
  out_dir = args.out_dir or os.path.join(
      common.RESULTS_DIR, "gpu_check_smoke" if args.smoke else "gpu_check")
  names = args.only.split(",") if args.only else list(STEPS)
  unknown = sorted(set(names) - set(STEPS))
  if unknown:
    parser.error(f"--only {unknown}: steps are {list(STEPS)}")
  steps = [(name, step_argv) for name, step_argv in fixed_steps(config, out_dir)
           if name in names]
  if args.dry_run:
    for name, step_argv in steps:
      print(name, config.limits[name], " ".join(step_argv))
    if "aa56" in names:
      print("aa56", config.limits["aa56"], "batches", config.aa56_batches, "then",
            config.aa56_smaller, "on the fastest of", AA_IMPLS)
    return steps
  os.makedirs(out_dir, exist_ok=True)
  runner = StepRunner(out_dir, config.budget_s)
  statuses, aa56 = {}, None
  for name, step_argv in steps:
    statuses[name] = runner(name, step_argv, config.limits[name])
  if "aa56" in names:
    # The search shares one limit: each attempt gets what the step has left.
    step_deadline = time.perf_counter() + config.limits["aa56"]
    def attempt(name, attempt_argv):
      return runner(name, attempt_argv, step_deadline - time.perf_counter())
    aa56 = largest_training_batch(config, attempt, fastest_impl(out_dir) or "cudnn", out_dir)
    statuses["aa56"] = "ok" if aa56["largest_batch"] else "no batch trained"
  rows = summarise(out_dir, config, statuses, aa56)
  common.save_results("gpu_check", rows, ("measure", "value", "target", "status"),
                      common.environment(), out_dir,
                      extra={"statuses": statuses, "aa56": aa56,
                             "total_s": config.budget_s - runner.left()})
  return rows


if __name__ == "__main__":
  main()
