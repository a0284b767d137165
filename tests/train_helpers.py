"""Paths and helpers shared by the test modules (this module holds no tests).

``REPO_ROOT`` is the repository, ``SHARED_DATA`` the real-data folder next to it (tests that
need it are skipped when it is absent). ``tiny_config()`` is the embedded default shrunk for
tests: aa_resnet_tiny at width 8 on digits, batch 64 over 8 simulated devices.
``TRAIN_PY_FLAGS`` is the same for ``train.py``. ``built_once`` shares an expensive read-only
folder between the test worker processes.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from aa_flax.checkpoint import read_state_arrays
from aa_flax.config_utils import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TRAIN_PY = str(REPO_ROOT / "train.py")

TINY = {
    "model.width": 8,
    "batch_size": 64,
    "eval_batch_size": 120,
    "num_train_steps": 12,
    "log_every_steps": 3,
    "checkpoint_every_steps": 6,
    "optimizer.warmup_epochs": 0.1,
    "data.num_threads": 1,
}
TRAIN_PY_FLAGS = [f"--config.{key}={value}" for key, value in TINY.items()]


def tiny_config(**overrides):
  """``configs/default.py`` with ``TINY`` and ``overrides`` (dotted keys as ``a__b``) applied."""
  config = load_config(str(REPO_ROOT / "configs" / "default.py"))
  for key, value in {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def subprocess_env(num_devices: int = 8) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def train_py_command(workdir, *extra_flags) -> list[str]:
  return [sys.executable, TRAIN_PY, f"--workdir={workdir}", *TRAIN_PY_FLAGS, *extra_flags]


def run_train_py(workdir, *extra_flags, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(train_py_command(workdir, *extra_flags), env=subprocess_env(),
                        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
  """The folder ``name`` that ``build(folder)`` fills, built once per test session.

  Under pytest-xdist every worker process has its own module-scoped fixtures; this folder is
  shared by them instead: the first worker to ask builds it while the others wait, then all
  read it. Callers must not change it (copy it first). A build that raised is redone.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's folder, above each worker's own
  folder, done = root / name, root / f"{name}.built"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(folder)
      done.touch()
  return folder


def final_state(workdir, step=None) -> dict:
  """The train state of checkpoint ``step`` (default: the newest) as numpy arrays."""
  checkpoints = Path(workdir) / "checkpoints"
  if step is None:
    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  return read_state_arrays(str(checkpoints / str(step)))


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
  paths_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
  for (path, x), (_, y) in zip(paths_a, paths_b):
    if rtol == 0.0 and atol == 0.0:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                 err_msg=str(path))


def read_json(path) -> dict:
  return json.loads(Path(path).read_text())


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
