"""Processes of a run end with it: data workers and their shared memory after a SIGKILL of
the trainer, and the other processes of a multi-process job after one of them dies."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from aa_flax.preemption import EXIT_PREEMPTED
from train_helpers import REPO_ROOT, run_train_py, subprocess_env, train_py_command

WORKERS = ["--config.data.num_workers=2"]


def _children(pid: int) -> dict[int, str]:
  """Live (non-zombie) processes whose parent is ``pid``: {pid: command line}."""
  found = {}
  for entry in Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      stat = (entry / "stat").read_text()
      cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # ended meanwhile
      continue
    state, ppid = stat.rpartition(")")[2].split()[:2]
    if int(ppid) == pid and state != "Z":
      found[int(entry.name)] = cmdline
  return found


def _alive(pid: int) -> bool:
  try:
    state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
  except OSError:
    return False
  return state != "Z"


def _shared_memory_in_use(pids) -> set[str]:
  """The ``/dev/shm`` files (shared memory, named semaphores) mapped by ``pids``."""
  names = set()
  for pid in pids:
    try:
      maps = (Path("/proc") / str(pid) / "maps").read_text()
    except OSError:
      continue
    names.update(line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line)
  return {name.removesuffix(" (deleted)") for name in names}


@pytest.mark.long_running
def test_sigkill_of_the_trainer_leaves_no_worker_process_nor_shared_memory(tmp_path):
  trainer = subprocess.Popen(
      train_py_command(tmp_path, *WORKERS, "--config.num_train_steps=100000"),
      env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    deadline = time.monotonic() + 120
    children, shared = {}, set()
    while time.monotonic() < deadline and trainer.poll() is None:
      children.update(_children(trainer.pid))
      workers = [c for c in children.values() if "spawn_main" in c]
      shared |= _shared_memory_in_use([trainer.pid, *children])
      if len(workers) >= 2 and any("psm_" in name for name in shared) and \
          (tmp_path / "metrics.jsonl").exists():  # training, batches coming from the workers
        break
      time.sleep(0.1)
    assert trainer.poll() is None and len(workers) == 2, children
    assert any("resource_tracker" in c for c in children.values()), children
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        any(_alive(pid) for pid in children) or any(os.path.exists(n) for n in shared)):
      time.sleep(0.1)
    assert {pid: c for pid, c in children.items() if _alive(pid)} == {}
    assert {name for name in shared if os.path.exists(name)} == set()
  finally:
    os.killpg(trainer.pid, signal.SIGKILL)  # whatever of the session is left


def test_a_clean_run_with_workers_leaks_no_shared_memory(tmp_path):
  run = run_train_py(tmp_path, *WORKERS)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "leaked" not in run.stderr
