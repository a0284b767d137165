"""Metrics out: console lines (absl logging), ``<workdir>/metrics.jsonl`` and TensorBoard
event files in ``<workdir>/tensorboard`` (tensorboardX; no TensorFlow). Only process 0 writes.

Each ``metrics.jsonl`` line is ``{"step": int, "split": "train" | "eval", <name>: float, ...}``.
"""

from __future__ import annotations

import json
import os
from typing import Any


METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricLogger:
  """Writes metric records; a no-op on processes other than 0 (``enabled=False``)."""

  def __init__(self, workdir: str, enabled: bool, resume_step: int = 0):
    """``resume_step > 0``: TensorBoard drops events after it written by an earlier run."""
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tensorboard = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR),
                                        purge_step=resume_step + 1 if resume_step else None)

  def truncate_after(self, step: int, keep_evals_at_step: bool = True) -> None:
    """Drops records newer than ``step`` (written by a run that died after its checkpoint),
    and eval records at ``step`` too unless ``keep_evals_at_step``."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as handle:
      records = [line for line in handle if line.strip()]
    kept = []
    for line in records:
      try:
        record = json.loads(line)
        if record["step"] < step or (record["step"] == step and (
            keep_evals_at_step or record["split"] != "eval")):
          kept.append(line)
      except (ValueError, KeyError):
        continue  # a line cut short by a kill
    temporary = f"{self.path}.tmp"
    with open(temporary, "w") as handle:  # atomic: a kill now leaves the old file whole
      handle.writelines(kept)
    os.replace(temporary, self.path)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as handle:
      handle.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name not in ("step", "split") and isinstance(value, (int, float)):
        self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    return value.item()
  return value
