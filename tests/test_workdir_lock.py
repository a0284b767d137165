"""``run.lock``: the holder checks it still holds it before each save; no record is trusted
forever; a lock path of the wrong kind is one error."""

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from aa_flax import storage
from aa_flax.errors import WorkdirError
from aa_flax.workdir_lock import STALE_AFTER_S, WorkdirLock
from train_helpers import REPO_ROOT, read_jsonl, subprocess_env, train_py_command


def _record(**fields) -> str:
  return json.dumps({"host": "other-host", "pid": 4242, "token": "theirs",
                     "refreshed": time.time(), **fields})


def test_a_deleted_or_taken_lock_is_noticed_by_its_holder(tmp_path):
  lock_file = tmp_path / "run.lock"
  with WorkdirLock(storage.path(tmp_path)) as lock:
    lock.confirm()  # still its own
    lock_file.unlink()
    with pytest.raises(WorkdirError, match=rf"The lock {lock_file} of this run was deleted; "
                                           "not saving"):
      lock.confirm("not saving")
    lock_file.write_text(_record(token=lock._token))  # a lost lock stays lost
    with pytest.raises(WorkdirError, match="was deleted"):
      lock.confirm()
  lock_file.unlink(missing_ok=True)
  with WorkdirLock(storage.path(tmp_path)) as lock:
    lock_file.write_text(_record())
    with pytest.raises(WorkdirError, match=rf"The lock {lock_file} of this run was taken by "
                                           r"another run \(host other-host, pid 4242\)"):
      lock.confirm()
  assert json.loads(lock_file.read_text())["token"] == "theirs"  # the new holder keeps it


@pytest.mark.parametrize("ahead_s", [STALE_AFTER_S + 60, 10 * 365 * 86400])
def test_a_lock_refreshed_in_the_future_is_not_trusted_forever(tmp_path, ahead_s):
  lock_file = tmp_path / "run.lock"
  lock_file.write_text(_record(refreshed=time.time() + ahead_s))
  with WorkdirLock(storage.path(tmp_path)):
    assert json.loads(lock_file.read_text())["host"] == socket.gethostname()


def test_a_lock_refreshed_a_little_ahead_still_holds(tmp_path):
  """Clocks of two hosts differ by seconds: such a record is a live holder's."""
  (tmp_path / "run.lock").write_text(_record(refreshed=time.time() + 30))
  with pytest.raises(WorkdirError, match=r"in use by another run \(host other-host, pid 4242"):
    WorkdirLock(storage.path(tmp_path)).acquire()


def test_a_lock_path_that_is_a_directory_is_one_error(tmp_path):
  (tmp_path / "run.lock").mkdir()
  with pytest.raises(WorkdirError, match=rf"{tmp_path / 'run.lock'} is a directory, not a "
                                         r"lock file"):
    WorkdirLock(storage.path(tmp_path)).acquire()
  assert (tmp_path / "run.lock").is_dir()  # left as it was


def _checkpoint_steps(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if \
      folder.exists() else []


@pytest.mark.long_running
def test_a_run_whose_lock_was_deleted_stops_before_its_next_save(tmp_path):
  flags = ["--config.num_train_steps=100000", "--config.log_every_steps=5",
           "--config.checkpoint_every_steps=20"]
  run = subprocess.Popen(train_py_command(tmp_path, *flags), env=subprocess_env(),
                         cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
  try:
    deadline = time.monotonic() + 240
    while not _checkpoint_steps(tmp_path) and run.poll() is None and \
        time.monotonic() < deadline:
      time.sleep(0.1)
    assert _checkpoint_steps(tmp_path) == [20]
    (tmp_path / "run.lock").unlink()
    stderr = run.communicate(timeout=240)[1]
  finally:
    if run.poll() is None:
      run.send_signal(signal.SIGKILL)
  assert run.returncode == 1, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  match = f"error: WorkdirError: The lock {tmp_path / 'run.lock'} of this run was deleted"
  assert last.startswith(match), stderr[-3000:]
  stopped = int(last.split("not saving checkpoint step ")[1].split()[0].rstrip(";:."))
  assert stopped % 20 == 0 and stopped > 20
  assert _checkpoint_steps(tmp_path)[-1] < stopped
  assert max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")) <= stopped
  assert not (tmp_path / "run.lock").exists()  # not recreated
