#!/usr/bin/env bash
# Installs everything (launch/setup.sh) and runs lint, the import-layer
# contract (pyproject.toml, [tool.importlinter]) and the test suite on CPU
# with 8 fake devices so that sharding is exercised.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check mesp_jax configs tests
.venv/bin/lint-imports
export XLA_FLAGS="--xla_force_host_platform_device_count=8"
export JAX_PLATFORMS=cpu
.venv/bin/python -m pytest tests "$@"
