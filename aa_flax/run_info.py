"""What a run cannot say about itself: wall time, machine and software, in ``run_info.json``.

``train.py`` (and any script that calls ``train_and_evaluate``) appends one *segment* per
invocation, so a preempted and resumed run lists each part; ``aa_flax.report`` sums them.

``<workdir>/run_info.json``::

  {"segments": [{"end_utc": "2026-11-29 01:02:03", "wall_time_s": 812.4, "step": 1400,
                 "preempted": false, "load_average_end": [1.9, 2.0, 2.1],
                 "environment": {...}}],
   "notes": ["CIFAR-10 (JPEG q75 copy), 10,000-image subset"]}
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Optional, Sequence

from aa_flax import storage
from aa_flax.workdir import RUN_INFO_FILE, read_json


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as handle:
      for line in handle:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  """The machine and software of this process: devices, CPU, Python and library versions."""
  import flax
  import jax
  import jaxlib
  import optax
  devices = jax.devices()
  return {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "cpu": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
  }


def describe_environment(env: dict[str, Any]) -> str:
  """One line: ``'8 x cpu (cpu backend) on 2 x Intel Xeon ...; jax 0.10.2, flax 0.12.8'``."""
  return (f"{env.get('device_count', '?')} x {env.get('device_kind', '?')} "
          f"({env.get('backend', '?')} backend) on {env.get('cpu_count', '?')} x "
          f"{env.get('cpu', '?')}; jax {env.get('jax', '?')}, flax {env.get('flax', '?')}")


def read(workdir: str) -> Optional[dict[str, Any]]:
  """``run_info.json`` of ``workdir``, or ``None`` when the run did not record one."""
  return read_json(storage.path(workdir) / RUN_INFO_FILE)


def record_segment(workdir: str, wall_time_s: float, result: dict[str, Any],
                   notes: Sequence[str] = ()) -> None:
  """Appends one invocation (wall time, final step, environment) to ``run_info.json``.

  ``result`` is what ``train_and_evaluate`` returned; ``notes`` (e.g. what the data is) are
  added once. Only process 0 writes.
  """
  import jax
  if jax.process_index() != 0:
    return
  info = read(workdir) or {"segments": [], "notes": []}
  info["segments"].append({
      "end_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
      "wall_time_s": round(float(wall_time_s), 2),
      "step": int(result.get("step", -1)),
      "preempted": bool(result.get("preempted", False)),
      "load_average_end": [round(v, 2) for v in os.getloadavg()],  # other work on the host
      "environment": environment(),
  })
  info["notes"] = list(dict.fromkeys([*info.get("notes", []), *notes]))
  storage.write_json(storage.path(workdir) / RUN_INFO_FILE, info)


def total_wall_time(info: Optional[dict[str, Any]]) -> Optional[float]:
  """Seconds summed over every recorded segment, or ``None`` if nothing was recorded."""
  if not info or not info.get("segments"):
    return None
  return sum(segment["wall_time_s"] for segment in info["segments"])
