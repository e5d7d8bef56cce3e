#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine with Python 3.11:
#   - Debian's dataset-fashion-mnist (the bundled default data) and python3-venv
#   - a virtual environment in .venv with mesp_jax and its pinned dependencies
# Idempotent: rerunning only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

need_apt=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
python3 -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import importlib.util as u, mesp_jax, grain, pytest, hypothesis, importlinter; assert u.find_spec('mlxtend')" 2>/dev/null; then
  echo "[setup] pip install -e .[test]"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
fi
.venv/bin/python -c "import jax, flax; print('[setup] jax', jax.__version__, 'flax', flax.__version__, 'devices', jax.devices())"
