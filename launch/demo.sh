#!/usr/bin/env bash
# The whole method on Fashion-MNIST, end to end, on a laptop CPU:
# BL-AE -> tokens -> gamma-ARVM -> samples -> report (runs/demo/report.md).
# Rerunning resumes where it stopped. Extra arguments go to mesp_jax.main.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
WORKDIR="${WORKDIR:-runs/demo}"
.venv/bin/python -m mesp_jax.main --config=configs/demo.py --workdir="$WORKDIR" "$@"
echo "report: $WORKDIR/report.md  samples: $WORKDIR/samples/samples.png"
