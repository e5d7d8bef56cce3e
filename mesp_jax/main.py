"""Entry point: ``python -m mesp_jax.main --config=configs/x.py[:variant]
--workdir=DIR [--config.a.b=value ...]``.

Intentionally only flags; the work happens in the stage named by
``config.stage`` (see ``mesp_jax/stages/``).

Mistakes the user can fix (a missing config file, a misspelt or mistyped
``--config.*`` flag, a workdir that cannot be written, bad or missing data,
a config value no stage can run with) are printed as one paragraph on stderr,
``error: <kind>: <what is wrong and what to do>``, and exit with status 2
before anything is compiled or trained. ``--verbosity=N`` on the command
line adds the traceback.
"""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mesp_jax import stages
from mesp_jax.base.config import (
    ConfigError,
    WorkdirError,
    check_command_line,
    check_workdir,
)
from mesp_jax.data import DataError, DataNotFoundError
from mesp_jax.train.checkpoint import CheckpointMismatchError
from mesp_jax.train.loop import (
    PREEMPTED_EXIT_CODE,
    NonFiniteLossError,
    Preempted,
)

USER_ERROR_EXIT_CODE = 2


class FlagError(ConfigError):
  """A command-line flag that absl refuses (unknown, missing or malformed)."""


# Errors whose message tells the user what to do (printed without traceback).
# NonFiniteLossError too: a rerun of the same command meets the same batch,
# so launchers must not relaunch it (exit 2).
USER_ERRORS = (ConfigError, DataError, DataNotFoundError,
               CheckpointMismatchError, WorkdirError, NonFiniteLossError)

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

_VERBOSE_ARG = re.compile(r"^--?(verbosity|v)(=|$)")


def _verbose(argv: Sequence[str]) -> bool:
  """Whether ``--verbosity`` (or ``-v``) is on the command line."""
  return any(_VERBOSE_ARG.match(a) for a in argv)


def report_user_error(error: BaseException, verbose: bool = False
                      ) -> NoReturn:
  """Prints ``error`` as one paragraph (and, if ``verbose``, its traceback
  first) on stderr and exits with :data:`USER_ERROR_EXIT_CODE`."""
  if verbose:
    traceback.print_exception(error, file=sys.stderr)
  print(f"error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT_CODE)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (``app.run``'s ``flags_parser``) with every user
  error, ours or absl's, reported as one paragraph and exit status 2."""
  verbose = _verbose(argv)
  usage = "(python -m mesp_jax.main --helpshort lists the flags)"
  try:
    check_command_line(argv)  # runs the config file once
  except ConfigError as e:
    report_user_error(e, verbose)
  except flags.Error as e:  # e.g. a missing --flagfile
    report_user_error(FlagError(f"{e} {usage}"), verbose)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    report_user_error(FlagError(f"{e} {usage}"), verbose)
  except (KeyError, AttributeError) as e:  # a field the check did not see
    text = (e.args[0] if e.args else str(e))
    text = str(text).strip("'\"").replace("\\n", " ").replace("\n", " ")
    report_user_error(FlagError(
        f"a --config.* flag names no field of the config: {text}"), verbose)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  verbose = flags.FLAGS["verbosity"].present
  if not verbose:  # orbax is chatty at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    stages.check_stage(_CONFIG.value)
    stages.check_paths(_CONFIG.value, _WORKDIR.value)  # before any mkdir
    check_workdir(_WORKDIR.value)
  except USER_ERRORS as e:
    report_user_error(e, verbose)
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
    # Something the user can fix: the message says what.
    report_user_error(e, verbose)
  except Preempted as e:
    # Saved and stopped: launchers rerun the command on this code.
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
