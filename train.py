"""Command-line training: flags -> config -> ``aa_flax.train_and_evaluate``.

  python train.py --workdir=/tmp/run [--config=configs/<file>.py[:<arg>]] [--config.a.b=v ...]

Without ``--config`` the embedded default (``configs/default.py``) runs. Every config key is
listed in docs/CONFIG.md. Multi-process runs (TPU pods, GPU clusters) call
``jax.distributed.initialize`` first; see README, "Devices, GPUs and TPU pods".
Each invocation appends its wall time and machine to ``<workdir>/run_info.json``.
Exit status: 0 done; 1 a user error (one line on stderr); 75 preempted by SIGTERM after
writing a checkpoint, or the workdir's storage unavailable for ``config.storage_retry_s``
(one line; rerun the same command to resume).
"""

import logging as python_logging
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "default.py")


def _config_arguments(argv: list[str]) -> tuple[str, list[str]]:
  """The ``--config`` spec and the keys of the ``--config.<key>=`` overrides in ``argv``."""
  spec, keys = _DEFAULT_CONFIG, []
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg.partition("=")[2]
    elif arg.startswith("--config."):
      keys.append(arg[len("--config."):].partition("=")[0])
  return spec, keys


def _exit_on_bad_config_arguments(argv: list[str]) -> None:
  """Checks the config file, its argument and every override key before absl sees them, so
  a mistake prints one line (with the closest valid names) instead of a traceback."""
  from aa_flax import config_utils
  from aa_flax.errors import ConfigError
  spec, keys = _config_arguments(argv)
  try:
    config_utils.check_override_keys(config_utils.load_config(spec), keys)
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _exit_on_bad_config_arguments(sys.argv)

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                               "eval results; a run resumes from its newest checkpoint.")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "Training config file (path[:arg]).",
                                          lock_config=True)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Call jax.distributed.initialize: auto = when a coordinator "
                                 "is given or a multi-process launch is detected.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (GPU clusters without SLURM/MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["workdir"])


def _quiet_orbax(record) -> bool:
  """Keeps orbax's per-save INFO chatter and its tracebacks out of the console (warnings and
  errors still show as one line each; a failed save ends the run with its own error)."""
  if "orbax" not in record.pathname:
    return True
  record.exc_info, record.exc_text = None, None
  return record.levelno >= logging.converter.STANDARD_WARNING


def _without_closed_loop_reports(previous_hook):
  """A ``sys.unraisablehook`` that drops "Event loop is closed" reports: when a save fails,
  orbax closes its event loop while tensorstore still completes the other writes, and
  tensorstore reports each one (the run ends with its own one-line error)."""
  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous_hook(unraisable)
  return hook


def _summary(config, workdir: str) -> str:
  """One line on what this run trains (the whole config goes to <workdir>/config.json)."""
  length = (f"{config.num_train_steps} steps" if config.num_train_steps > 0
            else f"{config.num_epochs:g} epochs")
  return (f"Training {config.model.name} on {config.data.name}, global batch "
          f"{config.batch_size}, {length}; workdir {workdir} (full config: config.json there).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  sys.unraisablehook = _without_closed_loop_reports(sys.unraisablehook)
  # jax reports at INFO each accelerator plugin it does not find (e.g. no TPU on a GPU host).
  python_logging.getLogger("jax._src.xla_bridge").setLevel(python_logging.WARNING)
  from aa_flax import parallel
  parallel.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                  _NUM_PROCESSES.value, _PROCESS_ID.value)
  import aa_flax
  from aa_flax import run_info
  from aa_flax.errors import AAFlaxError, StorageUnavailableError
  from aa_flax.preemption import EXIT_PREEMPTED
  logging.info(_summary(_CONFIG.value, _WORKDIR.value))
  start = time.perf_counter()
  try:
    result = aa_flax.train_and_evaluate(_CONFIG.value, _WORKDIR.value, progress="log")
  except AAFlaxError as error:
    print(f"error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    # The error line stays the last: after a failed save, tensorstore threads still report
    # each write that orbax abandoned ("Event loop is closed"), and interpreter teardown
    # would add more. An outage is retryable.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    os._exit(EXIT_PREEMPTED if isinstance(error, StorageUnavailableError) else 1)
  run_info.record_segment(_WORKDIR.value, time.perf_counter() - start, result)
  if result["preempted"]:
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main)
