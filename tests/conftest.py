"""Test set-up: 8 fake CPU devices so sharding is exercised everywhere, and
one persistent XLA compilation cache for the session.

Many tests compile the same small programs again (every ``loop.train`` of
the smoke BL-AE builds its step anew, and subprocesses start cold). The
cache is a fresh folder per session, shared with the subprocesses through
the environment and removed at the end; its keys are the programs, so it
changes no result.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="mesp_jax_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
else:
  _CACHE = None

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
  return REPO


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()}"


def pytest_sessionfinish(session, exitstatus):
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)
