"""Entry point: ``python -m mesp_jax.main --config=configs/x.py[:variant]
--workdir=DIR [--config.a.b=value ...]``.

Intentionally only flags; the work happens in the stage named by
``config.stage`` (see ``mesp_jax/stages/``).
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mesp_jax import stages
from mesp_jax.base.config import ConfigError
from mesp_jax.data import DataNotFoundError
from mesp_jax.train.checkpoint import CheckpointMismatchError
from mesp_jax.train.loop import PREEMPTED_EXIT_CODE, Preempted

# Errors whose message tells the user what to do (printed without traceback).
USER_ERRORS = (ConfigError, DataNotFoundError, CheckpointMismatchError)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and checkpoint folder.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (TPU pods, "
    "SLURM); the cluster is detected from the environment.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for clusters that "
    "jax cannot detect (e.g. launch/multiprocess_local.sh).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Process count (with --multihost).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (with --multihost).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO
    logging.set_verbosity(logging.WARNING)
  if _MULTIHOST.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  logging.info("JAX process %d/%d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  try:
    stages.run(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    # Something the user can fix: the message says what; no traceback.
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except Preempted as e:
    # Saved and stopped: launchers rerun the command on this code.
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
