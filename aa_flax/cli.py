"""Command-line training: flags -> config -> ``aa_flax.train_and_evaluate``.

  aa-flax-train --workdir=/tmp/run [--config=<file>.py[:<arg>]] [--config.a.b=v ...]

(``python train.py ...`` in a checkout is the same.) ``--config`` takes a path or the bare
file name of a shipped config (``cifar.py:aa_wrn28_10``; see
``config_utils.resolve_config_spec``). Without ``--config`` the embedded default
(``configs/default.py``) runs. Every config key is
listed in docs/CONFIG.md. Multi-process runs (TPU pods, GPU clusters) call
``jax.distributed.initialize`` first; see README, "Devices, GPUs and TPU pods".
Each invocation appends its wall time and machine to ``<workdir>/run_info.json``.
Exit status: 0 done; 1 a user error (one line on stderr; ``AA_FLAX_TRACEBACK=1`` also prints
its traceback); 75 preempted by SIGTERM after writing a checkpoint, another process of the
job died, or storage stayed unavailable (rerun the same command to resume).
"""

import logging as python_logging
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from aa_flax import config_utils

_DEFAULT_CONFIG = os.path.join(config_utils.shipped_configs_dir(), "default.py")


def _config_arguments(argv: list[str]) -> tuple[int | None, str, list[str]]:
  """The index of the ``--config`` argument in ``argv`` (None: absent), its spec and the keys
  of the ``--config.<key>=`` overrides."""
  index, spec, keys = None, _DEFAULT_CONFIG, []
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--config" and i + 1 < len(argv):
      index, spec = i + 1, argv[i + 1]
    elif arg.startswith("--config="):
      index, spec = i, arg.partition("=")[2]
    elif arg.startswith("--config."):
      keys.append(arg[len("--config."):].partition("=")[0])
  return index, spec, keys


def _checked_argv(argv: list[str]) -> list[str]:
  """``argv`` with a bare config name made its shipped file's path, after checking the config
  file, its argument and every override key before absl sees them, so that a mistake prints
  one line (with the closest valid names) instead of a traceback."""
  from aa_flax.errors import ConfigError, exit_with_error
  index, spec, keys = _config_arguments(argv)
  try:
    config_utils.check_override_keys(config_utils.load_config(spec), keys)
    resolved = config_utils.resolve_config_spec(spec)
  except ConfigError as error:
    exit_with_error(error)
  if index is None:
    return list(argv)
  prefix = "--config=" if argv[index].startswith("--config=") else ""
  return [*argv[:index], prefix + resolved, *argv[index + 1:]]


def _define_flags() -> None:
  """Defines the flags. ``DEFINE_config_file`` loads the config and applies the overrides it
  finds in ``sys.argv`` right away, so this runs after ``_checked_argv`` (not at import)."""
  global _WORKDIR, _CONFIG, _DISTRIBUTED, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                                 "eval results; a run resumes from its newest checkpoint.")
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Training config file: a path or the bare name of a shipped "
      "config ([path/]file.py[:arg]).", lock_config=True)
  _DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                   "Call jax.distributed.initialize: auto = when a "
                                   "coordinator is given or a multi-process launch is detected.")
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


def _where_results_are(config, workdir: str, result: dict) -> str:
  """The last line of a finished run: the final eval, where it is and how to see the curves."""
  from aa_flax import storage
  from aa_flax.workdir import EVAL_ONLY_DIR, EVAL_RESULTS_FILE, TENSORBOARD_DIR
  workdir = storage.path(workdir)
  evaluated = (f"test top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f} at step "
               f"{result['step']}")
  if config.eval_only:
    return f"Done: eval-only {evaluated}; results in {workdir / EVAL_ONLY_DIR}/"
  return (f"Done: {evaluated}; results in {workdir / EVAL_RESULTS_FILE}; curves: tensorboard "
          f"--logdir={workdir / TENSORBOARD_DIR}")


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
  from aa_flax.errors import (AAFlaxError, PeerLostError, StorageUnavailableError,
                              print_error)
  from aa_flax.preemption import EXIT_PREEMPTED
  logging.info(_summary(_CONFIG.value, _WORKDIR.value))
  start = time.perf_counter()
  try:
    result = aa_flax.train_and_evaluate(_CONFIG.value, _WORKDIR.value, progress="log")
  except AAFlaxError as error:
    print_error(error)
    # The error line stays the last: after a failed save, tensorstore threads still report
    # each write that orbax abandoned ("Event loop is closed"), and interpreter teardown
    # would add more; with a peer gone, the shutdown of jax.distributed would wait for the
    # coordination service's timeout. An outage or a lost peer is retryable.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    os._exit(EXIT_PREEMPTED if isinstance(error, (PeerLostError, StorageUnavailableError))
             else 1)
  run_info.record_segment(_WORKDIR.value, time.perf_counter() - start, result)
  if result["preempted"]:
    sys.exit(EXIT_PREEMPTED)
  logging.info(_where_results_are(_CONFIG.value, _WORKDIR.value, result))


def run() -> None:
  """The ``aa-flax-train`` console command (and ``train.py``)."""
  # config_flags reads the override flags from sys.argv itself.
  sys.argv = _checked_argv(sys.argv)
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
