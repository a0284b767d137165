"""Devices and data placement: multi-host start-up, the mesh, shardings, global batches.

One mesh axis, ``data``, spans every device of every process. The batch is sharded on it;
the train state is replicated. Each process feeds only its local share of a global batch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import re
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from aa_flax.errors import ConfigError, PeerLostError

DATA_AXIS = "data"
DISTRIBUTED_MODES = ("auto", "on", "off")
# Environment variables that mark a multi-process launch jax.distributed can auto-detect.
_MULTI_PROCESS_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _launched_multi_process() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return True
  return any(int(os.environ.get(name, "1") or 1) > 1 for name in _MULTI_PROCESS_ENV[1:])


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Calls ``jax.distributed.initialize`` when this run spans several processes.

  ``mode='on'`` always initialises (arguments not given are auto-detected: TPU pods,
  SLURM, Open MPI); ``'off'`` never; ``'auto'`` initialises when a coordinator address is
  given or the environment shows a multi-process launch (several TPU hosts, SLURM or MPI
  with more than one task). Must run before any other jax call.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ConfigError(f"Unknown distributed mode {mode!r}; valid: {', '.join(DISTRIBUTED_MODES)}.")
  if mode == "off" or (mode == "auto" and coordinator_address is None
                       and not _launched_multi_process()):
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


# How a collective of the CPU backend (gloo) reports that the process at the other end is
# gone, e.g. "Gloo AllGather failed: [.../pair.cc:538] Read error [10.0.0.2]:4567:
# Connection reset by peer".
_GLOO_FAILURE = re.compile(r"Gloo (?P<op>[\w-]+) failed: (?:\[[^\]]*\] )?(?P<cause>.*)")


@contextlib.contextmanager
def peer_loss_is_an_error() -> Iterator[None]:
  """Turns a collective that failed because another process is gone into
  ``PeerLostError`` (naming the peer as the collective saw it), so that the job stops at
  once instead of when the coordination service gives up on the dead process."""
  try:
    yield
  except (jax.errors.JaxRuntimeError, ValueError) as error:  # jit raises either, by path
    failure = _GLOO_FAILURE.search(str(error))
    if failure is None or jax.process_count() == 1:
      raise
    cause = failure["cause"].splitlines()[0]
    raise PeerLostError(
        f"Lost another process of this job ({failure['op']} with it failed: {cause}); "
        f"process {jax.process_index()} stops too. Rerun the job to resume from its last "
        "checkpoint.") from None


def create_mesh(devices: list[Any] | None = None) -> Mesh:
  """A 1-D ``Mesh`` with axis ``data`` over ``devices`` (default: all devices, all processes)."""
  # jax.devices() lists each process's devices together, so every process's share of a
  # global batch is one contiguous block of rows (what global_batch assembles). Auto axis
  # types: shardings are given explicitly to jit, and the model code stays sharding-agnostic.
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
  """``fn`` with ``mesh`` as the mesh in context while jax traces it (for ``jax.jit``).

  What must run per device looks the mesh up while tracing: the fused attention kernels split
  the batch over ``data`` (:mod:`aa_flax.kernels.per_device`). Other code is traced as without
  it (the axis is ``Auto``: shardings stay what jit's arguments give).
  """
  @functools.wraps(fn)
  def on_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return on_mesh


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "config.batch_size") -> None:
  """Raises ``ConfigError`` unless ``batch_size`` is a positive multiple of the device count."""
  num_devices = mesh.devices.size
  if batch_size <= 0 or batch_size % num_devices:
    raise ConfigError(
        f"{name}={batch_size} must be a positive multiple of the number of devices "
        f"({num_devices} over {jax.process_count()} process(es)); e.g. "
        f"{max(1, round(batch_size / num_devices)) * num_devices}.")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's ``[L, ...]`` arrays into global ``[L * processes, ...]`` arrays.

  The result is sharded on ``data``; process ``p``'s rows come ``p``-th in the global order.
  """
  sharding = batch_sharded(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}


class DeviceBatches:
  """Global batches put on the devices by a background thread, up to ``ahead`` in advance.

  Wraps an iterator of local host batches. While the training loop runs step ``k``, the
  thread already reads batch ``k + 1`` from the host pipeline and starts its transfer, so a
  step need not wait for the host or the link. The caller counts the batches it takes (the
  trainer checkpoints that position), so batches still in flight never affect a resume.

  ``wait_seconds`` adds up the time the loop spent blocked waiting for a batch: near zero
  when the devices bound the step, most of the step when the input pipeline does.
  Use as a context manager (or call ``close``) to stop the thread and the host iterator.
  """

  def __init__(self, host_batches, mesh: Mesh, ahead: int = 2):
    if ahead < 1:
      raise ValueError(f"ahead={ahead} must be >= 1.")
    self._host = host_batches
    self._mesh = mesh
    self._queue: queue.Queue = queue.Queue(maxsize=ahead)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, daemon=True,
                                    name="aa_flax-device-batches")
    self._thread.start()
    self.wait_seconds = 0.0

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        batch = global_batch(next(self._host), self._mesh)
        self._put((batch, None))
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
      self._put((None, error))

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self) -> "DeviceBatches":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    start = time.perf_counter()
    batch, error = self._queue.get()
    self.wait_seconds += time.perf_counter() - start
    if error is not None:
      self._queue.put((None, error))  # every later call raises it too
      raise error
    return batch

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=60)  # a daemon: a host read that hangs cannot block exit
    close = getattr(self._host, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> "DeviceBatches":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
