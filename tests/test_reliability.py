"""Reliability: preemption (SIGTERM), SIGKILL at random points, corrupt checkpoints, exact
resume, non-finite steps, config changes on resume, bad workdirs.

The subprocess runs use ``train.py`` with the tiny digits config (``test_train_support``)
for 160 steps; resumed runs must end bitwise identical to the uninterrupted one.
"""

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aa_flax
from aa_flax.data import InputPipeline, load_splits
from aa_flax.errors import ConfigMismatchError, NonFiniteError, WorkdirError
from aa_flax.preemption import EXIT_PREEMPTED
from test_train_support import (assert_trees_equal, final_state, read_json, read_jsonl,
                                run_train_py, subprocess_env, tiny_config, train_py_command,
                                REPO_ROOT)

STEPS = 160
LONG_RUN = [f"--config.num_train_steps={STEPS}", "--config.log_every_steps=5",
            "--config.checkpoint_every_steps=40", "--config.keep_checkpoints=2",
            "--config.eval_every_steps=30"]


def _start(workdir, *flags) -> subprocess.Popen:
  return subprocess.Popen(train_py_command(workdir, *LONG_RUN, *flags), env=subprocess_env(),
                          cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _logged_step(workdir: Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return -1
  steps = [line.split(",", 1)[0] for line in path.read_text().splitlines() if line.strip()]
  return max((int(s.split(":")[1]) for s in steps if s.startswith('{"step"')), default=-1)


def _wait_for_step(process: subprocess.Popen, workdir: Path, step: int, timeout=240) -> bool:
  """Waits until ``metrics.jsonl`` shows ``step``; False if the run ended first."""
  deadline = time.monotonic() + timeout
  while _logged_step(workdir) < step:
    if process.poll() is not None:
      return False
    assert time.monotonic() < deadline, "timed out waiting for training to reach a step"
    time.sleep(0.005)
  return True


def _assert_same_run(workdir: Path, reference: Path) -> None:
  assert read_json(workdir / "eval_results.json") == read_json(reference / "eval_results.json")
  assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(reference / "metrics.jsonl")
  assert_trees_equal(final_state(workdir), final_state(reference))  # bitwise
  leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
  assert not leftovers, f"temporary checkpoint directories left behind: {leftovers}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("reference")
  run = run_train_py(workdir, *LONG_RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir


def test_sigterm_checkpoints_exits_75_and_resumes_bitwise(reference_run, tmp_path):
  process = _start(tmp_path)
  reached = _wait_for_step(process, tmp_path, 15)  # a chosen step, between two checkpoints
  assert reached, f"run ended early: {process.stderr.read()[-3000:]}"
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
  assert "Preempted: checkpoint of step" in stderr
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert 15 <= steps[-1] < STEPS and steps[-1] % 40 != 0  # the preemption checkpoint
  assert not (tmp_path / "eval_results.json").exists()
  run = run_train_py(tmp_path, *LONG_RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"Resumed from {tmp_path / 'checkpoints' / str(steps[-1])}" in run.stderr
  _assert_same_run(tmp_path, reference_run)


def test_sigkill_and_sigterm_at_random_points_resume_bitwise(reference_run, tmp_path):
  """Kills land anywhere, saves included (a checkpoint every 5 steps, async)."""
  rng = random.Random(1234)
  for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
    process = _start(tmp_path, "--config.checkpoint_every_steps=5")
    # The run has started training once it logs past what earlier runs logged.
    if _wait_for_step(process, tmp_path, _logged_step(tmp_path) + 1):
      time.sleep(rng.uniform(0.0, 0.5))
    if process.poll() is None:
      process.send_signal(sig)
    process.communicate(timeout=120)
    assert process.returncode in (-signal.SIGKILL, EXIT_PREEMPTED, 0), process.returncode
  run = run_train_py(tmp_path, *LONG_RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  _assert_same_run(tmp_path, reference_run)


def test_rerunning_a_finished_run_changes_nothing(reference_run, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(reference_run, workdir)
  evals = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [30, 60, 90, 120, 150, STEPS]
  run = run_train_py(workdir, *LONG_RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  _assert_same_run(workdir, reference_run)


def test_truncated_newest_checkpoint_falls_back_to_previous(reference_run, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(reference_run, workdir)
  (workdir / "eval_results.json").unlink()
  newest = workdir / "checkpoints" / str(STEPS)
  data_files = sorted((f for f in (newest / "state").rglob("*") if f.is_file()),
                      key=lambda f: f.stat().st_size)
  victim = data_files[-1]
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  run = run_train_py(workdir, *LONG_RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"Checkpoint step {STEPS} is unreadable" in run.stderr
  assert f"Resumed from {workdir / 'checkpoints' / str(STEPS - 40)}" in run.stderr
  quarantined = list((workdir / "corrupt_checkpoints").iterdir())
  assert [p.name.split("-")[0] for p in quarantined] == [str(STEPS)]
  _assert_same_run(workdir, reference_run)


class _MarkerModel(nn.Module):
  """Linear classifier whose logits are NaN for any batch holding an all-white image."""
  num_classes: int = 4

  @nn.compact
  def __call__(self, images, train: bool = False):
    flat = images.reshape(images.shape[0], -1)
    marker = jnp.any(jnp.all(flat > 5.0, axis=-1))  # white = (1 - 0.2) / 0.1 = 8 after norm
    logits = nn.Dense(self.num_classes)(flat)
    return jnp.where(marker, jnp.nan, logits)


def _marker_data(tmp_path, num_markers=2):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 60, (62, 4, 4, 1), np.uint8)
  images = np.concatenate([images, np.full((num_markers, 4, 4, 1), 255, np.uint8)])
  labels = rng.integers(0, 4, len(images))
  np.savez(tmp_path / "train.npz", images=images, labels=labels)
  np.savez(tmp_path / "eval.npz", images=images[:20], labels=labels[:20])


def _marker_config(tmp_path, **overrides):
  return tiny_config(**{
      "data.name": "npz", "data.train_files": str(tmp_path / "train.npz"),
      "data.eval_files": str(tmp_path / "eval.npz"), "data.mean": (0.2,), "data.std": (0.1,),
      "batch_size": 8, "eval_batch_size": 8, "num_train_steps": 24, "log_every_steps": 4,
      "checkpoint_every_steps": 2, "keep_checkpoints": 30, **overrides})


def _marker_steps(config) -> list[int]:
  """Training steps (1-based) whose batch holds a marker image."""
  splits = load_splits(config.data, seed=config.seed)
  dataset = InputPipeline(splits, global_batch_size=config.batch_size,
                          eval_global_batch_size=config.eval_batch_size, image_size=(4, 4),
                          augment="none", seed=config.seed).train_dataset()
  return [b + 1 for b in range(config.num_train_steps)
          if (dataset[b]["image"] == 255).all(axis=(1, 2, 3)).any()]


def test_nonfinite_step_stops_and_keeps_good_checkpoints(tmp_path):
  _marker_data(tmp_path)
  config = _marker_config(tmp_path)
  bad_step = _marker_steps(config)[0]
  assert bad_step > 2, "choose data whose first marker comes after the first checkpoint"
  workdir = tmp_path / "run"
  with pytest.raises(NonFiniteError) as error:
    aa_flax.train_and_evaluate(config, str(workdir), model=_MarkerModel())
  last_good = (bad_step - 1) // 2 * 2
  message = str(error.value)
  assert f"at step {bad_step}" in message
  assert f"Last good checkpoint: {workdir / 'checkpoints' / str(last_good)}" in message
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert steps[-1] == last_good  # nothing at or after the bad step was saved
  for step in steps:
    state = final_state_of(workdir, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def final_state_of(workdir: Path, step: int) -> dict:
  from aa_flax.checkpoint import read_state_arrays
  return read_state_arrays(str(workdir / "checkpoints" / str(step)))


def test_nonfinite_steps_are_skipped_when_asked(tmp_path):
  _marker_data(tmp_path)
  config = _marker_config(tmp_path, on_nonfinite="skip")
  bad_steps = _marker_steps(config)
  assert bad_steps
  result = aa_flax.train_and_evaluate(config, str(tmp_path / "run"), model=_MarkerModel())
  assert np.isfinite(result["loss"]) and result["num_examples"] == 20
  train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
  assert train[-1]["skipped_steps"] == len(bad_steps)
  assert all(np.isfinite(r["loss"]) for r in train)  # skipped steps stay out of the means
  state = final_state(tmp_path / "run")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_resume_with_changed_model_or_data_is_refused_unless_allowed(tmp_path):
  _marker_data(tmp_path, num_markers=0)
  workdir = str(tmp_path / "run")
  aa_flax.train_and_evaluate(_marker_config(tmp_path, num_train_steps=4), workdir,
                             model=_MarkerModel())
  changed = _marker_config(tmp_path, num_train_steps=8, **{"data.augment": "flip",
                                                           "model.name": "resnet50"})
  with pytest.raises(ConfigMismatchError) as error:
    aa_flax.train_and_evaluate(changed, workdir, model=_MarkerModel())
  message = str(error.value)
  assert "data.augment: checkpoint 'none' -> now 'flip'" in message
  assert "model.name: checkpoint 'aa_resnet_tiny' -> now 'resnet50'" in message
  assert "allow_config_mismatch" in message and "num_train_steps" not in message
  changed.allow_config_mismatch = True
  result = aa_flax.train_and_evaluate(changed, workdir, model=_MarkerModel())
  assert result["step"] == 8


def test_unwritable_workdir_and_full_disk_fail_before_training(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(WorkdirError, match="is not writable"):
    aa_flax.train_and_evaluate(tiny_config(), str(blocker / "workdir"))
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1024))
  with pytest.raises(WorkdirError, match=r"has 0.0 MiB free but the checkpoints need about"):
    aa_flax.train_and_evaluate(tiny_config(), str(tmp_path / "full"))
  assert not (tmp_path / "full" / "checkpoints").exists()


def _free_port() -> int:
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


MULTI_STEPS = 40  # steps over gloo between two processes are slow on two cores


def _start_two_processes(workdir: Path, *flags) -> list[subprocess.Popen]:
  """``train.py`` as 2 processes x 4 CPU devices (gloo collectives, localhost coordinator)."""
  env = subprocess_env(num_devices=4)
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  port = _free_port()
  return [subprocess.Popen(
      train_py_command(workdir, *LONG_RUN, f"--config.num_train_steps={MULTI_STEPS}", *flags,
                       f"--coordinator_address=127.0.0.1:{port}",
                       "--num_processes=2", f"--process_id={i}"),
      env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes(tmp_path):
  processes = _start_two_processes(tmp_path)
  assert _wait_for_step(processes[0], tmp_path, 10), processes[0].stderr.read()[-3000:]
  processes[1].send_signal(signal.SIGTERM)  # only one host hears of the preemption
  outputs = [p.communicate(timeout=120)[1] for p in processes]
  assert [p.returncode for p in processes] == [EXIT_PREEMPTED] * 2, outputs[1][-3000:]
  stop_steps = {line.split("checkpoint of step ")[1].split(" ")[0]
                for out in outputs for line in out.splitlines() if "Preempted:" in line}
  assert len(stop_steps) == 1  # both processes stopped after the same step
  stop = int(stop_steps.pop())
  assert stop % 5 == 0 and stop < MULTI_STEPS  # agreed at a log step
  assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == stop
  resumed = _start_two_processes(tmp_path)
  outputs = [p.communicate(timeout=300)[1] for p in resumed]
  assert [p.returncode for p in resumed] == [0, 0], outputs[0][-3000:]
  assert f"Resumed from {tmp_path / 'checkpoints' / str(stop)}" in outputs[0]
  results = read_json(tmp_path / "eval_results.json")
  assert results["step"] == MULTI_STEPS and results["num_examples"] == 360
