"""Metrics out: console lines (absl logging), ``<workdir>/metrics.jsonl`` and TensorBoard
event files in ``<workdir>/tensorboard`` (tensorboardX; no TensorFlow). Only process 0 writes.

Each ``metrics.jsonl`` line is strict JSON ``{"step": int, "split": "train" | "eval",
<name>: float or null, ...}`` (null: no value, e.g. a window whose steps were all skipped).

On cloud storage (``gs://...``) objects cannot be appended to: ``metrics.jsonl`` is rewritten
whole at every record, and TensorBoard events are written to a local staging directory and
uploaded (whole files) to ``<workdir>/tensorboard`` at every record, where TensorBoard reads
them (``tensorboard --logdir gs://bucket/run/tensorboard``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any

from etils import epath

from aa_flax import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricLogger:
  """Writes metric records; a no-op on processes other than 0 (``enabled=False``)."""

  def __init__(self, workdir: epath.Path, enabled: bool, resume_step: int = 0):
    """``resume_step > 0``: TensorBoard drops events after it written by an earlier run."""
    self.enabled = enabled
    self.path = workdir / METRICS_FILE
    self._remote = storage.is_remote(workdir)
    self._lines: list[str] = []  # the whole file, kept for rewriting it on object stores
    self._tensorboard = None
    self._tensorboard_dir = workdir / TENSORBOARD_DIR
    self._staging = None
    if enabled:
      from tensorboardX import SummaryWriter
      if self._remote:
        self._lines = self._read_lines()
        self._staging = epath.Path(tempfile.mkdtemp(prefix="aa_flax_tensorboard_"))
      logdir = self._staging or self._tensorboard_dir
      self._tensorboard = SummaryWriter(logdir=str(logdir),
                                        purge_step=resume_step + 1 if resume_step else None)

  def _read_lines(self) -> list[str]:
    if not self.path.exists():
      return []
    return [line + "\n" for line in self.path.read_text().splitlines() if line.strip()]

  def truncate_after(self, step: int, keep_evals_at_step: bool = True) -> None:
    """Drops records newer than ``step`` (written by a run that died after its checkpoint),
    and eval records at ``step`` too unless ``keep_evals_at_step``."""
    if not self.enabled or not self.path.exists():
      return
    kept = []
    for line in self._read_lines():
      try:
        record = json.loads(line)
        if record["step"] < step or (record["step"] == step and (
            keep_evals_at_step or record["split"] != "eval")):
          kept.append(line)
      except (ValueError, KeyError):
        continue  # a line cut short by a kill
    self._lines = kept if self._remote else []
    storage.write_text(self.path, "".join(kept))  # atomic: a kill leaves the old file whole

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    line = storage.dumps(record) + "\n"
    if self._remote:
      self._lines.append(line)
      storage.write_text(self.path, "".join(self._lines))
    else:
      with self.path.open("a") as handle:
        handle.write(line)
    for name, value in record.items():
      if name not in ("step", "split") and isinstance(value, (int, float)):
        self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))
    self._tensorboard.flush()
    self._upload_events()

  def _upload_events(self) -> None:
    if self._staging is None:
      return
    self._tensorboard_dir.mkdir(parents=True, exist_ok=True)
    for event_file in self._staging.iterdir():
      (self._tensorboard_dir / event_file.name).write_bytes(event_file.read_bytes())

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._upload_events()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    return value.item()
  return value
