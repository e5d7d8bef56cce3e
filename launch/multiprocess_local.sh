#!/usr/bin/env bash
# Runs N JAX processes on this machine (CPU), each with D fake devices, joined
# by jax.distributed: a rehearsal of a multi-host pod run on one box.
#   N=2 D=4 bash launch/multiprocess_local.sh --config=configs/blae_fashion_mnist.py:smoke --workdir=/tmp/mp
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-2}"; D="${D:-4}"; PORT="${PORT:-12355}"
PY="${PY:-.venv/bin/python}"
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" JAX_PLATFORMS=cpu \
    "$PY" -m mesp_jax.main --multihost --coordinator_address="localhost:$PORT" \
    --num_processes="$N" --process_id="$i" "$@" > "/tmp/mesp_jax_proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for ((i = 0; i < N; i++)); do echo "== process $i"; tail -n 3 "/tmp/mesp_jax_proc$i.log"; done
exit $status
