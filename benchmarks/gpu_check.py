"""One-GPU performance check of issue 4, in one run (needs only jax, flax, optax, numpy).

Measures, each step in its own process (an out-of-memory step cannot take the rest down):

1. ``plain``: ResNet-50 train img/s (bf16, batch 256, 224 px);
2. ``aa_xla``: AA-ResNet-50, XLA attention (gather form), same settings;
3. ``aa_pallas``: AA-ResNet-50 with the fused Pallas kernel;
4. ``aa56_pallas``: AA-ResNet-50 augmented from the 56x56 stage on, no pooling, batch 128,
   with the fused kernel — does it train, at what speed and peak memory;
5. ``aa_cudnn``: AA-ResNet-50 with relative attention on cuDNN flash attention;
6. ``attention_layers``: forward / forward+backward time of AA-ResNet-50's 13 augmented
   attention layers (batch 256, bf16) for plain, gather, skew, fused, fused_plain, cudnn;
7. ``aa56_cudnn``: step 4 with the cuDNN path;
8. ``attention_sizes``: the attention micro-benchmark at 7, 14, 28, 56 (batch 8, bf16).

Steps run in this order, most important first; ``--only a,b`` runs a subset (e.g. what a
first run's budget cut off).

Then writes ``gpu_check.md``/``.json`` with the ratios the issue asks for: AA-ResNet-50 / ResNet-50
img/s (target >= 0.85), ResNet-50 img/s (target >= 5800 on one H100), and whether the 56x56
runs (steps 4 and 7) trained. Steps stop being started once ``--budget-s`` (default 460 s) is spent,
and a running step is killed at that mark, so the whole check ends within 8 minutes.
``--smoke`` runs the same plan with tiny models and sizes, for a CPU check.

  python -m benchmarks.gpu_check                 # on the GPU machine
  python -m benchmarks.gpu_check --smoke         # on CPU: plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common

TARGET_AA_RATIO = 0.85
TARGET_RESNET50_IMG_S = 5800.0

AA56 = ["--override", "attention_stages=(0,1,2,3)", "--override", "attention_pool_stages=()"]
FULL = {
    "train": ["--batch", "256", "--image-size", "224", "--dtype", "bfloat16", "--steps", "30",
              "--warmup", "3"],
    "plain": ["--models", "resnet50"],
    "aa": ["--models", "aa_resnet50"],
    "aa56": ["--models", "aa_resnet50", "--batch", "128", *AA56],
    "attention_layers": ["--suite", "aa_resnet50", "--batch", "256", "--dtypes", "bfloat16",
                         "--methods", "plain,gather,skew,fused,fused_plain,cudnn",
                         "--reps", "5"],
    "attention_sizes": ["--suite", "sizes", "--batch", "8", "--dtypes", "bfloat16",
                        "--methods", "plain,gather,skew,naive,fused,cudnn", "--reps", "5"],
}
# Same plan on CPU in seconds: the tiny AA-ResNet (its plain twin has no augmented stage).
SMOKE = {
    "train": ["--batch", "8", "--image-size", "16", "--dtype", "float32", "--steps", "2",
              "--warmup", "1", "--num-classes", "10"],
    "plain": ["--models", "aa_resnet_tiny", "--override", "attention_stages=()"],
    "aa": ["--models", "aa_resnet_tiny"],
    "aa56": ["--models", "aa_resnet_tiny", "--batch", "4", "--override",
             "attention_stages=(0,1,2)"],
    "attention_layers": ["--suite", "aa_resnet50", "--batch", "1", "--dtypes", "float32",
                         "--methods", "plain,gather,fused,cudnn", "--reps", "1"],
    "attention_sizes": ["--suite", "sizes", "--sizes", "7", "--batch", "1", "--dtypes",
                        "float32", "--methods", "plain,skew,fused", "--reps", "1"],
}


def plan(config: dict, out_dir: str) -> list[tuple[str, list[str]]]:
  """``(step name, argv)`` for every step, in run order."""
  train = [sys.executable, "-m", "benchmarks.bench_train", "--out-dir", out_dir]
  attn = [sys.executable, "-m", "benchmarks.bench_attention", "--out-dir", out_dir]
  def aa(impl):
    return config["aa"] + ["--override", f"attention_impl={impl}", "--name", f"aa_{impl}"]

  def aa56(impl):
    return (config["aa56"] + ["--override", f"attention_impl={impl}",
                              "--name", f"aa56_{impl}"])

  # Most important first: the run stops starting steps when the budget is spent.
  return [
      ("plain", train + config["train"] + config["plain"] + ["--name", "plain"]),
      ("aa_xla", train + config["train"] + aa("xla")),
      ("aa_pallas", train + config["train"] + aa("pallas")),
      # The later --batch wins in argparse, so aa56 overrides the shared train batch.
      ("aa56_pallas", train + config["train"] + aa56("pallas")),
      ("aa_cudnn", train + config["train"] + aa("cudnn")),
      ("attention_layers", attn + config["attention_layers"] + ["--name", "attention_layers"]),
      ("aa56_cudnn", train + config["train"] + aa56("cudnn")),
      ("attention_sizes", attn + config["attention_sizes"] + ["--name", "attention_sizes"]),
  ]


def _load(out_dir: str, name: str):
  path = os.path.join(out_dir, f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def summarise(out_dir: str, statuses: dict[str, str]) -> list[dict]:
  """Ratios against the issue's targets, from the step results present."""
  def first_row(name):
    result = _load(out_dir, name)
    return result["rows"][0] if result else None

  plain = first_row("plain")
  plain_img_s = plain["img_per_s"] if plain else None
  rows = [{"measure": f"{plain['model'] if plain else 'plain'} img/s", "value": plain_img_s,
           "target": f">= {TARGET_RESNET50_IMG_S:g} for resnet50 on one H100"}]
  for impl in ("xla", "pallas", "cudnn"):
    row = first_row(f"aa_{impl}")
    label = f"{row['model'] if row else 'aa'} ({impl})"
    rows.append({"measure": f"{label} img/s", "value": row["img_per_s"] if row else None,
                 "target": ""})
    rows.append({"measure": f"{label} / plain",
                 "value": row["img_per_s"] / plain_img_s if row and plain_img_s else None,
                 "target": f">= {TARGET_AA_RATIO}"})
  for impl in ("pallas", "cudnn"):
    row = first_row(f"aa56_{impl}")
    rows.append({"measure": f"augmented from the 56x56 stage, no pooling, {impl}: img/s",
                 "value": row["img_per_s"] if row else None,
                 "target": f"trains ({statuses.get(f'aa56_{impl}', 'not run')})"})
    if row:
      rows.append({"measure": "  ... its device peak MiB", "value": row["device_peak_mib"],
                   "target": ""})
  layers = _load(out_dir, "attention_layers")
  for total in (layers or {}).get("extra", {}).get("totals", []):
    rows.append({"measure": f"13 AA layers fwd+bwd ms, {total['method']} {total['dtype']}",
                 "value": total["fwd_bwd_ms"], "target": ""})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU check")
  parser.add_argument("--budget-s", type=float, default=460.0,
                      help="no step starts after this many seconds")
  parser.add_argument("--out-dir", default=None)
  parser.add_argument("--dry-run", action="store_true", help="print the plan only")
  parser.add_argument("--only", default=None, help="comma-separated step names to run")
  args = parser.parse_args(argv)
  out_dir = args.out_dir or os.path.join(
      common.RESULTS_DIR, "gpu_check_smoke" if args.smoke else "gpu_check")
  steps = plan(SMOKE if args.smoke else FULL, out_dir)
  if args.only:
    names = args.only.split(",")
    unknown = sorted(set(names) - {name for name, _ in steps})
    if unknown:
      parser.error(f"--only {unknown}: steps are {[name for name, _ in steps]}")
    steps = [(name, argv_) for name, argv_ in steps if name in names]
  if args.dry_run:
    for name, argv_ in steps:
      print(name, " ".join(argv_))
    return steps
  os.makedirs(out_dir, exist_ok=True)
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  start = time.perf_counter()
  statuses = {}
  for name, argv_ in steps:
    remaining = args.budget_s - (time.perf_counter() - start)
    if remaining <= 5:
      statuses[name] = "skipped: budget spent"
      continue
    print(f"== {name} ({remaining:.0f} s left): {' '.join(argv_)}", flush=True)
    step_start = time.perf_counter()
    try:
      proc = subprocess.run(argv_, cwd=repo_root, timeout=remaining, text=True,
                            capture_output=True, check=False)
      output = proc.stdout + proc.stderr
      statuses[name] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as e:
      output = (e.stdout or "") + (e.stderr or "") if isinstance(e.stdout, str) else ""
      statuses[name] = "timed out"
    with open(os.path.join(out_dir, f"{name}.log"), "w") as f:
      f.write(output)
    tail = "\n".join(output.strip().splitlines()[-8:])
    print(f"{statuses[name]} in {time.perf_counter() - step_start:.0f} s\n{tail}", flush=True)
  env = common.environment()
  rows = summarise(out_dir, statuses)
  common.save_results("gpu_check", rows, ("measure", "value", "target"), env, out_dir,
                      extra={"statuses": statuses,
                             "total_s": time.perf_counter() - start})
  print("\nstep statuses:", json.dumps(statuses, indent=1))
  return rows


if __name__ == "__main__":
  main()
