"""Command-line training: flags -> config -> ``aa_flax.train_and_evaluate``.

  python train.py --workdir=/tmp/run [--config=configs/<file>.py[:<arg>]] [--config.a.b=v ...]

Without ``--config`` the embedded default (``configs/default.py``) runs. Multi-process runs
(TPU pods, GPU clusters) call ``jax.distributed.initialize`` first; see README, "Multi-host".
Exit status: 0 done; 1 a user error (message on stderr); 75 preempted by SIGTERM after
writing a checkpoint (rerun the same command to resume).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "default.py")

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
  """Keeps orbax's per-save INFO chatter out of the console (warnings still show)."""
  return "orbax" not in record.pathname or record.levelno >= logging.converter.STANDARD_WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  from aa_flax import parallel
  parallel.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                  _NUM_PROCESSES.value, _PROCESS_ID.value)
  import aa_flax
  from aa_flax.errors import AAFlaxError
  from aa_flax.preemption import EXIT_PREEMPTED
  logging.info("Config:\n%s", _CONFIG.value)
  try:
    result = aa_flax.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except AAFlaxError as error:
    logging.error("%s: %s", type(error).__name__, error)
    print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(1)
  if result["preempted"]:
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main)
