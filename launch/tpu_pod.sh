#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM pod slice.
#   TPU=my-pod ZONE=us-central2-b bash launch/tpu_pod.sh configs/arvm_cifar10.py gs://bucket/runs/arvm
# Each worker clones/updates the repo, installs jax[tpu] and mesp_jax, and runs
# the same command; jax.distributed.initialize() detects the pod by itself.
# The workdir must be shared storage (a gs:// bucket) that Orbax can write.
set -euo pipefail
CONFIG="${1:?config file}"; WORKDIR="${2:?workdir (gs://...)}"; shift 2
TPU="${TPU:?set TPU=name}"; ZONE="${ZONE:?set ZONE=zone}"
REPO="${REPO:?set REPO=the git URL of your mesp_jax clone}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d mesp_jax ] || git clone $REPO mesp_jax
  cd mesp_jax && git pull --ff-only
  python3 -m pip install -q -U 'jax[tpu]' -e .
  python3 -m mesp_jax.main --multihost --config=$CONFIG --workdir=$WORKDIR $*
"
