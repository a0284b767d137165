"""Shared helpers of the benchmarks: environment, timing, compiled memory, result files.

Benchmarks and experiments print and save; they never assert. Results go to
``benchmarks/results/`` (git ignored) as ``<name>.json`` (machine readable, with the
environment and the command) and ``<name>.md`` (the table that docs/PERFORMANCE.md quotes).
Every script builds its command line on :func:`argument_parser` (``--name``, ``--out-dir``).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from aa_flax import run_info

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIB = 2.0 ** 20


def argument_parser(doc: str, name: str | None) -> argparse.ArgumentParser:
  """A parser described by the first line of ``doc``; for a script that saves results
  (``name`` given) with the options they share: ``--name`` (results file name, default
  ``name``) and ``--out-dir`` (default :data:`RESULTS_DIR`)."""
  parser = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
  if name is not None:
    parser.add_argument("--name", default=name, help="results file name (.json and .md)")
    parser.add_argument("--out-dir", default=RESULTS_DIR, help="where results are written")
  return parser


def parse_override(text: str) -> tuple[str, Any]:
  """``name=value`` -> ``(name, value)``; value parsed as a Python literal, else a string."""
  if "=" not in text:
    raise ValueError(f"override {text!r} is not of the form name=value")
  name, raw = text.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return name.strip(), value


def add_override_argument(parser: argparse.ArgumentParser, flag: str = "--override",
                          help_text: str = "name=value passed to create_model (repeatable)"):
  """A repeatable ``name=value`` option parsed by :func:`parse_override` into a list of pairs."""
  parser.add_argument(flag, action="append", type=parse_override, default=[], help=help_text)


def environment() -> dict[str, Any]:
  """``run_info.environment()`` (devices, CPU, software versions) with the exact command line
  of this run and the time."""
  return {
      **run_info.environment(),
      "command": " ".join([os.path.basename(sys.executable), "-m",
                           _module_name(), *sys.argv[1:]]),
      "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
  }


def _module_name() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  return spec.name if spec is not None else os.path.relpath(sys.argv[0])


def median_seconds(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
  """Median wall time of ``fn()`` (which must block on its result) over ``reps`` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_memory(compiled) -> dict[str, float]:
  """Memory XLA planned for a compiled program, in MiB.

  ``temp``: scratch buffers live inside the program (activations saved for the backward,
  logits, ...); ``peak``: arguments + outputs + temp - aliased (donated) bytes, an upper
  bound of what the program holds at once.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {"temp_mib": float("nan"), "peak_mib": float("nan")}
  temp = analysis.temp_size_in_bytes
  peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + temp
          - analysis.alias_size_in_bytes)
  return {"temp_mib": temp / MIB, "peak_mib": peak / MIB}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """Rows of dicts -> a markdown table over ``columns`` (floats to 4 significant digits)."""
  def fmt(value):
    if isinstance(value, float):
      return f"{value:.4g}"
    return "" if value is None else str(value)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def save_results(name: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                 env: dict[str, Any], out_dir: str = RESULTS_DIR, extra: Any = None) -> str:
  """Writes ``<out_dir>/<name>.json`` and ``.md``, prints the table; returns the md path."""
  os.makedirs(out_dir, exist_ok=True)
  table = markdown_table(rows, columns)
  header = (f"`{env['command']}`\n\n{env['device_count']} x {env['device_kind']} "
            f"({env['backend']}), jax {env['jax']}, flax {env['flax']}, {env['utc']} UTC\n")
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump({"environment": env, "rows": list(rows), "extra": extra}, f, indent=1,
              default=str)
  md_path = os.path.join(out_dir, f"{name}.md")
  with open(md_path, "w") as f:
    f.write(header + "\n" + table + "\n")
  print(header)
  print(table, flush=True)
  return md_path
