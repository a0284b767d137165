"""Processes of a run end with it: data workers and their shared memory after a SIGKILL of
the trainer, and the other processes of a multi-process job after one of them dies."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import pytest

from aa_flax import parallel
from aa_flax.errors import PeerLostError
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


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _logged_step(workdir: Path) -> int:
  metrics = workdir / "metrics.jsonl"
  lines = metrics.read_text().splitlines() if metrics.exists() else []
  return max((int(line.split(",")[0].split(":")[1]) for line in lines if line), default=-1)


@pytest.mark.long_running
def test_sigkill_of_one_of_two_processes_stops_the_other_at_once_with_exit_75(tmp_path):
  """2 processes x 1 CPU device with gloo collectives; the coordination service (in process
  0) would only notice the dead process 1 after its heartbeat timeout (over a minute)."""
  killed = 1
  env = subprocess_env(num_devices=1)
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  env["PYTHONFAULTHANDLER"] = "1"  # a survivor that hangs shows where (SIGABRT below)
  port = _free_port()
  processes = [subprocess.Popen(
      train_py_command(tmp_path, "--config.num_train_steps=100000",
                       "--config.log_every_steps=5", "--config.checkpoint_every_steps=20",
                       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                       f"--process_id={i}"),
      env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  survivor = processes[1 - killed]
  try:
    deadline = time.monotonic() + 240
    while _logged_step(tmp_path) < 10 and time.monotonic() < deadline and \
        all(p.poll() is None for p in processes):
      time.sleep(0.1)
    assert _logged_step(tmp_path) >= 10
    processes[killed].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
      stderr = survivor.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
      survivor.send_signal(signal.SIGABRT)
      stderr = survivor.communicate()[1]
    elapsed = time.monotonic() - killed_at
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  assert survivor.returncode == EXIT_PREEMPTED, stderr[-3000:]
  assert elapsed < 30
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: PeerLostError: Lost another process of this job ("), last
  assert "[127.0.0.1]:" in last  # the lost peer's address


@pytest.mark.parametrize("operation", ["AllGather", "all-reduce"])  # as jax 0.10 words them
def test_only_a_failed_collective_of_a_multi_process_job_is_a_lost_peer(monkeypatch,
                                                                        operation):
  gloo = (f"UNKNOWN: Gloo {operation} failed: [external/gloo/gloo/transport/tcp/pair.cc:538] "
          "Read error [10.0.0.2]:4567: Connection reset by peer")
  with pytest.raises(ValueError, match="Gloo"), parallel.peer_loss_is_an_error():
    raise ValueError(gloo)  # one process: no peer to lose
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(PeerLostError) as lost, parallel.peer_loss_is_an_error():
    raise jax.errors.JaxRuntimeError(gloo)
  assert str(lost.value).startswith(
      f"Lost another process of this job ({operation} with it failed: Read error "
      "[10.0.0.2]:4567: Connection reset by peer); process 1 stops too.")
  with pytest.raises(ValueError, match="bad shape"), parallel.peer_loss_is_an_error():
    raise ValueError("bad shape")
