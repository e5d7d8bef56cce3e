#!/usr/bin/env bash
# Runs a mesp_jax config on every worker of a Cloud TPU pod slice and keeps
# relaunching it after preemptions until it finishes.
#
#   TPU=my-pod ZONE=us-central2-b ACCELERATOR=v5p-128 \
#   REPO=https://github.com/me/mesp_jax.git \
#   bash launch/tpu_pod.sh [--dry-run] CONFIG[:variant] gs://BUCKET/RUN [--config.x=y ...]
#
# The workdir is a bucket because every worker has its own disk. The program
# reads and writes local paths only (it refuses a gs:// workdir), so the
# script mounts the bucket with Cloud Storage FUSE (gcsfuse) at the same path
# on every worker, GCS_MOUNT_ROOT/BUCKET (default /gcs/BUCKET), and runs the
# job with --workdir=/gcs/BUCKET/RUN.
#
# One round of the loop:
#   1. make sure the slice exists and is up: reuse it, or create it (through a
#      queued resource by default) and wait until it is ACTIVE/READY; a
#      preempted or failed slice is deleted and created again;
#   2. on a new slice (and once per invocation), install the project on all
#      workers (clone or update REPO, check out REF, install gcsfuse from its
#      apt repository if it is missing or older than 3.x, pip install
#      'jax[tpu]' and the project);
#   3. mount the bucket on all workers unless it is mounted already (a worker
#      VM may have restarted since the last launch; see mount_bucket);
#   4. start `python3 -m mesp_jax.main --multihost ...` on all workers, detached
#      (see launch_job), and stream worker 0's log until the job ends;
#   5. read every worker's exit code: 0 -> done (exit 0); 2 -> a user error
#      that a rerun cannot fix (exit 2); anything else (75 = stopped by
#      SIGTERM after a checkpoint, a crash, a preempted slice) -> back to 1.
#      The rerun is the same command: it resumes from the newest checkpoint
#      in the mounted workdir.
# `bash launch/tpu_pod.sh --help` lists the variables.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: [VAR=value ...] bash launch/tpu_pod.sh [--dry-run] CONFIG[:variant] WORKDIR [--config.x=y ...]

Runs `python3 -m mesp_jax.main --multihost --config=CONFIG --workdir=... ...`
on every worker of a Cloud TPU pod slice, creating the slice if needed and
relaunching after preemptions until the run exits 0 (or 2: a user error).
WORKDIR must be a gs://BUCKET/PATH URI: every worker has its own disk, and
the program itself refuses gs:// paths. So before every launch the bucket is
mounted with gcsfuse on every worker at GCS_MOUNT_ROOT/BUCKET (unless it is
mounted there already; default /gcs/BUCKET), and the job gets
--workdir=/gcs/BUCKET/PATH. Paths in the same bucket (data,
--config.inputs.*) are there too: /gcs/BUCKET/...

Required:
  TPU           name of the TPU VM slice (the node)
  ZONE          its zone, e.g. us-central2-b
  REPO          git URL of your mesp_jax repository, cloned on every worker
  ACCELERATOR   e.g. v5p-128, v5litepod-64, v6e-256, v4-32; needed to create
                the slice (not to reuse an existing one)
Optional:
  PROJECT       Google Cloud project (default: gcloud's configured project)
  REF           branch, tag or commit to check out (default: REPO's default branch)
  RUNTIME       TPU software version (default by ACCELERATOR: v2-alpha-tpuv6e,
                v2-alpha-tpuv5, v2-alpha-tpuv5-lite, tpu-ubuntu2204-base for v4)
  QUEUED=1      create through a queued resource (default; 0 for v2/v3)
  QR_NAME       queued resource name (default: TPU-qr)
  SPOT=1        spot (preemptible) capacity
  MAX_RESTARTS  relaunches allowed before giving up (default 20)
  DELETE_AFTER=1  delete the slice when the run has finished with exit 0
  POLL          seconds between state polls (default 30)
  RETRY_SLEEP   seconds to wait before a relaunch (default 60)
  STRAGGLER_WAIT  seconds to wait for the other workers after worker 0 ends
                (default 300)
  GCS_MOUNT_ROOT  folder under which the workdir's bucket is mounted on
                every worker (default /gcs: the bucket at /gcs/BUCKET)
  ALLOW_LOCAL_WORKDIR=1  accept a non-gs:// workdir, passed as it is, with no
                mount (only for a file system mounted at the same path on
                every worker)
  VERBOSE=1     also print the read-only polls (describe, exit codes)
Dry run (nothing is executed; commands are printed with a "+ " prefix, the
mount and the job's --workdir included):
  DRY_RUN=1 or --dry-run
  DRY_RUN_EXIT_CODES  exit codes of the simulated job, one per launch, comma
                separated; the last one repeats (default 0). "preempt" makes
                the slice preempted during that launch.
  DRY_RUN_STATE  initial simulated slice state: NOT_FOUND (default), or the
                healthy state (ACTIVE, READY) to reuse it, or SUSPENDED/
                PREEMPTED to recreate it

Exit status: 0 the run finished; 2 a user error (usage, bad config, missing
data, mismatched checkpoint); otherwise the last failure once MAX_RESTARTS
relaunches are used up.
EOF
}

# ---- small helpers -----------------------------------------------------------

# Written for bash 3.2 too (macOS): no empty "${array[@]}" under set -u, hence
# the ${a[@]+"${a[@]}"} idiom.
exec 3>&1  # the "+ command" trace goes to the original stdout, also from $(...)
DRY_RUN=${DRY_RUN:-0}

log() { printf '[tpu_pod %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 2; }
dry() { [[ $DRY_RUN == 1 ]]; }
nap() { dry || sleep "$1"; }

# Prints an argument so that a shell reads it back unchanged: as it is when
# it holds only harmless characters, otherwise in single quotes.
shell_word() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command, one line, prefixed by "+ ".
trace() {
  local line="+" arg
  for arg in "$@"; do line+=" $(shell_word "$arg")"; done
  printf '%s\n' "$line" >&3
}

# Runs a command that changes something (create, delete, ssh); a dry run only
# prints it.
run() {
  trace "$@"
  dry || "$@"
}

# Runs a read-only command and prints its output; printed only in a dry run or
# with VERBOSE=1, since these run every POLL seconds. In a dry run it prints
# the simulated answer $DRY_ANSWER instead.
query() {
  if dry || [[ $VERBOSE == 1 ]]; then trace "$@"; fi
  if dry; then printf '%s\n' "$DRY_ANSWER"; return 0; fi
  "$@"
}

# Quotes a value for the workers' shell (bash on the TPU VM).
q() { printf '%q' "$1"; }

# Runs COMMAND (one line of shell) on the workers WHICH ("all" or "0").
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU" "${WHERE[@]}" --worker="$1" \
    "${SSH_FLAGS[@]}" --command="$2"
}

# ---- configuration -------------------------------------------------------------

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      *) break ;;
    esac
  done
  (($# >= 2)) || { usage >&2; exit 2; }
  CONFIG=$1
  WORKDIR=$2
  shift 2
  EXTRA_ARGS=("$@")
}

default_runtime() {
  case $1 in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5lite* | v5e*) echo v2-alpha-tpuv5-lite ;;
    v4* | v3* | v2*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# Sets BUCKET, MOUNT_POINT and JOB_WORKDIR (the --workdir the job gets) from
# WORKDIR: gs://BUCKET/PATH -> GCS_MOUNT_ROOT/BUCKET/PATH, mounted with
# gcsfuse on every worker; with ALLOW_LOCAL_WORKDIR=1 a local path is passed
# as it is (BUCKET and MOUNT_POINT empty: no mount).
resolve_workdir() {
  BUCKET="" MOUNT_POINT="" JOB_WORKDIR=$WORKDIR
  if [[ $WORKDIR != gs://* ]]; then
    # Every worker has its own disk: checkpoints must go to shared storage.
    [[ ${ALLOW_LOCAL_WORKDIR:-0} == 1 ]] ||
      die "the workdir must be a gs://BUCKET/PATH URI (got '$WORKDIR'): every" \
        "worker of a pod has its own disk, so a local path would split the" \
        "checkpoints. The bucket is mounted with gcsfuse on every worker." \
        "Set ALLOW_LOCAL_WORKDIR=1 only for a file system mounted on all workers."
    return 0
  fi
  local rest=${WORKDIR#gs://} path="" part
  while [[ $rest == */ ]]; do rest=${rest%/}; done
  BUCKET=${rest%%/*}
  [[ $rest != */* ]] || path=${rest#*/}
  # Bucket names: 3 to 222 of a-z 0-9 . _ -, starting and ending with a
  # letter or digit.
  local bucket_re='^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$'
  [[ $BUCKET =~ $bucket_re ]] ||
    die "'$WORKDIR' does not start with gs://BUCKET (a bucket name is 3 to 222" \
      "lowercase letters, digits, '.', '_' or '-')"
  local parts
  IFS=/ read -ra parts <<<"$path"
  for part in ${parts[@]+"${parts[@]}"}; do
    [[ -n $part && $part != . && $part != .. ]] ||
      die "the workdir '$WORKDIR' has an empty, '.' or '..' path component"
  done
  local root=${GCS_MOUNT_ROOT:-/gcs}
  while [[ $root == ?*/ ]]; do root=${root%/}; done
  [[ $root == /* && $root != / ]] ||
    die "GCS_MOUNT_ROOT must be an absolute path other than / (got '$root')"
  MOUNT_POINT=$root/$BUCKET
  JOB_WORKDIR=$MOUNT_POINT${path:+/$path}
}

configure() {
  DRY_RUN=${DRY_RUN:-0}
  VERBOSE=${VERBOSE:-0}
  local missing=() var
  for var in TPU ZONE REPO; do [[ -n ${!var:-} ]] || missing+=("$var"); done
  ((${#missing[@]} == 0)) || die "set ${missing[*]} (see --help)"
  ACCELERATOR=${ACCELERATOR:-}
  REF=${REF:-}
  SPOT=${SPOT:-0}
  MAX_RESTARTS=${MAX_RESTARTS:-20}
  DELETE_AFTER=${DELETE_AFTER:-0}
  POLL=${POLL:-30}
  RETRY_SLEEP=${RETRY_SLEEP:-60}
  STRAGGLER_WAIT=${STRAGGLER_WAIT:-300}
  QR_NAME=${QR_NAME:-$TPU-qr}
  if [[ -z ${QUEUED:-} ]]; then
    case $ACCELERATOR in v2-* | v3-*) QUEUED=0 ;; *) QUEUED=1 ;; esac
  fi
  if [[ -z ${RUNTIME:-} && -n $ACCELERATOR ]]; then
    RUNTIME=$(default_runtime "$ACCELERATOR") ||
      die "no default runtime for ACCELERATOR=$ACCELERATOR; set RUNTIME"
  fi
  RUNTIME=${RUNTIME:-}

  resolve_workdir

  WHERE=(--zone="$ZONE")
  [[ -z ${PROJECT:-} ]] || WHERE+=(--project="$PROJECT")
  # --quiet: no prompts. gcloud sets no ssh keepalive; without one, the stream
  # of a preempted worker's log could hang for hours.
  SSH_FLAGS=(--quiet --ssh-flag=-oServerAliveInterval=30
    --ssh-flag=-oServerAliveCountMax=10 --ssh-flag=-oConnectTimeout=60)
  dry || command -v gcloud >/dev/null || die "gcloud is not installed"

  # The job: the same command on every worker and at every launch.
  JOB_CMD="python3 -m mesp_jax.main --multihost --config=$(q "$CONFIG") --workdir=$(q "$JOB_WORKDIR")"
  local arg
  for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do JOB_CMD+=" $(q "$arg")"; done

  # Dry-run simulation.
  if dry; then
    HEALTHY_STATE=$( ((QUEUED)) && echo ACTIVE || echo READY)
    PREEMPTED_STATE=$( ((QUEUED)) && echo SUSPENDED || echo PREEMPTED)
    DRY_STATE=${DRY_RUN_STATE:-NOT_FOUND}
    IFS=, read -ra DRY_CODES <<<"${DRY_RUN_EXIT_CODES:-0}"
    ((${#DRY_CODES[@]})) || DRY_CODES=(0)
  fi
}

# ---- the slice -----------------------------------------------------------------

# Prints the slice's state: the queued resource's (ACCEPTED, PROVISIONING,
# WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, FAILED, ...) or, without queued
# resources, the node's (CREATING, READY, PREEMPTED, ...); NOT_FOUND when it
# does not exist, UNKNOWN when gcloud fails otherwise.
slice_state() {
  local cmd out err rc=0
  if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources describe "$QR_NAME" "${WHERE[@]}"
      --format='value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$TPU" "${WHERE[@]}"
      --format='value(state)')
  fi
  err=$(mktemp)
  out=$(DRY_ANSWER=${DRY_STATE:-} query "${cmd[@]}" 2>"$err") || rc=$?
  if ((rc == 0)); then
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'not.?found' "$err"; then
    echo NOT_FOUND
  else
    sed 's/^/  gcloud: /' "$err" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

is_healthy() { [[ $1 == ACTIVE || $1 == READY ]]; }

create_slice() {
  [[ -n $ACCELERATOR ]] ||
    die "the slice $TPU does not exist; set ACCELERATOR (e.g. v5p-128) to create it"
  local spot=()
  [[ $SPOT != 1 ]] || spot=(--spot)
  log "creating the slice $TPU ($ACCELERATOR, $RUNTIME)"
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$TPU" \
      "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
      --runtime-version="$RUNTIME" ${spot[@]+"${spot[@]}"} || return 1
  else
    run gcloud compute tpus tpu-vm create "$TPU" "${WHERE[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${spot[@]+"${spot[@]}"} ||
      return 1
  fi
  if dry; then DRY_STATE=$HEALTHY_STATE; fi
  NEED_INSTALL=1  # a new slice has nothing installed
}

delete_slice() {
  log "deleting the slice $TPU"
  if ((QUEUED)); then
    # --force also deletes the node that the queued resource holds.
    run gcloud compute tpus queued-resources delete "$QR_NAME" "${WHERE[@]}" \
      --force --quiet || return 1
  else
    run gcloud compute tpus tpu-vm delete "$TPU" "${WHERE[@]}" --quiet || return 1
  fi
  if dry; then DRY_STATE=NOT_FOUND; fi
}

# Reuses, creates or recreates the slice, then waits until it is up.
# Fails when the slice ends up unusable (the caller counts a restart).
ensure_slice() {
  local state
  state=$(slice_state)
  case $state in
    ACTIVE | READY) return 0 ;;
    NOT_FOUND) create_slice || return 1 ;;
    SUSPENDED | SUSPENDING | FAILED | PREEMPTED | TERMINATED)
      log "the slice $TPU is $state: recreating it"
      delete_slice || return 1
      create_slice || return 1 ;;
    STOPPED)
      run gcloud compute tpus tpu-vm start "$TPU" "${WHERE[@]}" || return 1
      NEED_INSTALL=1 ;;
    *) ;;  # being created or provisioned, or UNKNOWN: wait below
  esac
  wait_until_up
}

wait_until_up() {
  local state last=""
  while :; do
    state=$(slice_state)
    if is_healthy "$state"; then
      log "the slice $TPU is $state"
      return 0
    fi
    case $state in
      NOT_FOUND | SUSPENDED | SUSPENDING | FAILED | PREEMPTED | TERMINATED)
        log "the slice $TPU is $state"
        return 1 ;;
    esac
    dry && die "dry run: the simulated state $state never becomes ready"
    [[ $state == "$last" ]] || log "waiting for the slice $TPU: $state"
    last=$state
    nap "$POLL"
  done
}

slice_is_up() { is_healthy "$(slice_state)"; }

# ---- the job on the workers ------------------------------------------------------
# The workers keep the job's files in ~/mesp_jax_job: job.log (output of the
# current launch; older ones are renamed job.DATE.log), pid and exit (the
# exit code, written when the job ends). Each remote command is one line of
# shell that starts with J=... so that it reads its own paths.

install_project() {
  local ref=${REF:-HEAD}  # origin/HEAD: the default branch
  local gcsfuse=""
  [[ -z $BUCKET ]] || gcsfuse="$GCSFUSE_INSTALL; "
  log "installing $REPO${REF:+ at $REF}${BUCKET:+ and gcsfuse} on all workers"
  on_workers all "set -e; ${gcsfuse}\
if [ -d mesp_jax/.git ]; then git -C mesp_jax fetch -q --tags origin; \
else git clone -q $(q "$REPO") mesp_jax; fi; cd mesp_jax; \
if git rev-parse -q --verify origin/$(q "$ref") >/dev/null; \
then git checkout -q --detach origin/$(q "$ref"); else git checkout -q --detach $(q "$ref"); fi; \
python3 -m pip install -q -U \"jax[tpu]\" -e ."
}

# (The single-quoted $... below are for the workers' shell: SC2016 is meant.)

# The major version of the worker's gcsfuse (0 when there is none).
# shellcheck disable=SC2016
GCSFUSE_VERSION='v=$(gcsfuse --version 2>/dev/null | sed -n "s/^gcsfuse version \([0-9][0-9]*\).*/\1/p"); v=${v:-0}'

# Installs gcsfuse from its Debian/Ubuntu apt repository (TPU VM images are
# Ubuntu) when it is missing or older than 3.x (mount_bucket's flags need a
# recent one), or fails saying what to install.
# shellcheck disable=SC2016
GCSFUSE_INSTALL=$GCSFUSE_VERSION'; if [ "$v" -lt 3 ]; then sudo -n sh -c "set -e; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg -o /usr/share/keyrings/cloud.google.asc; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" > /etc/apt/sources.list.d/gcsfuse.list; apt-get update -q >/dev/null || true; DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 gcsfuse" || echo "warning: installing gcsfuse failed on $(hostname)" >&2; fi; command -v gcsfuse >/dev/null || { echo "error: gcsfuse is not installed on $(hostname) and could not be installed: install the Debian package gcsfuse (3.x) from the gcsfuse-$(lsb_release -cs 2>/dev/null || echo CODENAME) apt repository of packages.cloud.google.com/apt, then rerun" >&2; exit 1; }; '$GCSFUSE_VERSION'; [ "$v" -ge 3 ] || echo "warning: gcsfuse $(gcsfuse --version 2>/dev/null | head -n 1) on $(hostname) is older than 3.x and may not know the mount flags" >&2'

# gcsfuse's flags for the workdir (an Orbax checkpoint folder written by all
# workers at once):
#   --implicit-dirs: folders that exist only as a prefix of object names
#     (objects written by gcloud storage or another tool, not through a
#     mount, have no folder object) are seen as folders;
#   --rename-dir-limit=200000: Orbax saves a step into a temporary folder and
#     renames it when the save completes; on a flat bucket gcsfuse renames a
#     folder (a copy and a delete of each object) only if it holds fewer
#     objects than this (default 0). 200000 is what gcsfuse's own
#     aiml-checkpointing profile sets; hierarchical-namespace buckets rename
#     folders atomically anyway;
#   --metadata-cache-ttl-secs=0, --metadata-cache-negative-ttl-secs=0: no stat,
#     type or "not found" caching, so that each worker sees at once what the
#     others wrote (the defaults cache for 60 s and 5 s, and recent gcsfuse
#     turns the TTL up to "forever" on high-performance machine types, TPU
#     v5p and v6e VMs among them, unless these flags are given).
#   No --cache-dir: the file (content) cache stays off; the kernel's list
#   cache is off by default (--kernel-list-cache-ttl-secs=0).
GCSFUSE_FLAGS="--implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 --metadata-cache-negative-ttl-secs=0"

# Mounts the workdir's bucket at MOUNT_POINT on all workers, unless it is
# mounted and answers there already. Runs before every launch: a worker VM
# that restarted (maintenance, a host error) comes back with no mounts, and a
# gcsfuse that died leaves a dead mount ("Transport endpoint is not
# connected"), which is unmounted lazily first. The folder is created with
# sudo when the user may not (/gcs), and given to the user, who runs
# gcsfuse, so that the job (the same user) owns the files. gcsfuse goes to
# the background once the bucket is mounted and outlives the ssh session; its
# log is ~/mesp_jax_job/gcsfuse.log.
mount_bucket() {
  log "mounting gs://$BUCKET at $MOUNT_POINT on all workers (if not mounted" \
    "yet); the job's workdir: $JOB_WORKDIR"
  local m b
  m=$(q "$MOUNT_POINT") b=$(q "$BUCKET")
  # shellcheck disable=SC2016
  on_workers all 'M='"$m"'; J=$HOME/mesp_jax_job; mkdir -p $J; if mountpoint -q "$M" && timeout 120 ls -f "$M" >/dev/null 2>&1; then :; else command -v gcsfuse >/dev/null || { echo "error: gcsfuse is not installed on $(hostname): install the Debian package gcsfuse (the install step does, on a new slice or when the script starts)" >&2; exit 1; }; { fusermount -uz "$M" || fusermount3 -uz "$M"; } >/dev/null 2>&1; { mkdir -p "$M" && [ -w "$M" ]; } 2>/dev/null || { sudo -n mkdir -p "$M" && sudo -n chown "$(id -u):$(id -g)" "$M"; } || { echo "error: cannot make the mount point $M on $(hostname)" >&2; exit 1; }; gcsfuse '"$GCSFUSE_FLAGS"' --log-file=$J/gcsfuse.log '"$b"' "$M" || { echo "error: gcsfuse could not mount gs://'"$b"' at $M on $(hostname) (see $J/gcsfuse.log there)" >&2; exit 1; }; echo "$(hostname): mounted gs://'"$b"' at $M"; fi'
}

# Stops a job left running by an earlier launch (TERM, then KILL after 60 s),
# since it would hold the TPU chips, then waits for its subshell to write its
# exit file, so that the old exit code cannot land after the new launch began.
# shellcheck disable=SC2016
STOP_OLD='if [ -s $J/pid ]; then p=$(cat $J/pid); if kill $p 2>/dev/null; then for i in $(seq 60); do kill -0 $p 2>/dev/null || break; sleep 1; done; kill -9 $p 2>/dev/null || true; for i in $(seq 10); do [ -s $J/exit ] && break; sleep 1; done; fi; fi'

# Prints each worker's job state: exit=CODE, exit=running or exit=lost (no
# job, or it died without writing its exit code; the subshell writes it right
# after the job ends, hence the short grace).
# shellcheck disable=SC2016
STATUS='J=$HOME/mesp_jax_job; if [ -s $J/pid ] && kill -0 "$(cat $J/pid)" 2>/dev/null; then echo exit=running; else [ -s $J/exit ] || sleep 2; if [ -s $J/exit ]; then echo "exit=$(cat $J/exit)"; else echo exit=lost; fi; fi'

# Starts the job on all workers and returns at once. Why detached: an ssh
# session that streams the job for days dies with any network blip or with
# the machine running this script, and would take the job with it. So the
# job runs in a background subshell that ignores SIGHUP and has no terminal
# or pipe to the ssh session (all three standard streams redirected; gcloud
# allocates no tty for --command), writes its output to job.log on its own
# worker, its pid to pid and, when it ends, its exit code to exit.
# follow_job then streams worker 0's log with `tail --pid`, which stops when
# the job does.
launch_job() {
  LAUNCHES=$((LAUNCHES + 1))
  log "launch $LAUNCHES: $JOB_CMD"
  # shellcheck disable=SC2016
  on_workers all 'J=$HOME/mesp_jax_job; mkdir -p $J; '"$STOP_OLD"'; rm -f $J/pid $J/exit; if [ -f $J/job.log ]; then mv $J/job.log $J/job.$(date +%Y%m%d-%H%M%S).log; fi; cd $HOME/mesp_jax || exit 1; ( trap "" HUP; '"$JOB_CMD"' > $J/job.log 2>&1 < /dev/null & echo $! > $J/pid; wait $!; echo $? > $J/exit ) > /dev/null 2>&1 < /dev/null &'
}

# Streams worker 0's log from line FROM (+1: the start) until its job ends.
follow_cmd() {
  # shellcheck disable=SC2016
  printf '%s' 'J=$HOME/mesp_jax_job; for i in $(seq 120); do [ -s $J/pid ] && break; sleep 1; done; [ -s $J/pid ] || { echo "no job started on worker 0" >&2; exit 1; }; tail -n '"$1"' -F --pid="$(cat $J/pid)" $J/job.log 2>/dev/null'
}

# Prints the exit=... words of WHICH workers (empty when ssh fails).
job_states() {
  local out
  out=$(DRY_ANSWER="" query gcloud compute tpus tpu-vm ssh "$TPU" "${WHERE[@]}" \
    --worker="$1" "${SSH_FLAGS[@]}" --command="$STATUS" 2>/dev/null) || true
  grep -o 'exit=[a-z0-9]*' <<<"$out" | cut -d= -f2 | tr '\n' ' ' || true
}

# Shows worker 0's output until the job ends there. When the stream breaks
# while the slice is up and the job still runs (a network blip), reattaches.
follow_job() {
  local from=+1
  log "streaming worker 0's log (Ctrl-C stops watching, not the job)"
  while :; do
    on_workers 0 "$(follow_cmd "$from")" || true
    dry && return 0
    slice_is_up || return 0
    [[ $(job_states 0) == *running* ]] || return 0
    log "lost the stream of worker 0's log while the job runs; reattaching"
    from=20
    nap 10
  done
}

# Sets RESULT: 0, 2, another exit code, "preempted", "lost" (the job
# vanished), "running" (a worker still runs STRAGGLER_WAIT seconds after
# worker 0 ended) or "unreachable" (ssh failed).
job_result() {
  if dry; then
    job_states all >/dev/null
    local i=$((LAUNCHES - 1)) last=$((${#DRY_CODES[@]} - 1))
    ((i <= last)) || i=$last
    RESULT=${DRY_CODES[i]}
    log "dry run: the simulated job ends with: $RESULT"
    if [[ $RESULT == preempt ]]; then DRY_STATE=$PREEMPTED_STATE; RESULT=preempted; fi
    return 0
  fi
  local waited=0 states code
  while :; do
    if ! slice_is_up; then RESULT=preempted; return 0; fi
    read -ra states <<<"$(job_states all)"
    if ((${#states[@]} == 0)); then RESULT=unreachable; return 0; fi
    if [[ " ${states[*]} " == *" running "* ]] && ((waited < STRAGGLER_WAIT)); then
      nap "$POLL"
      waited=$((waited + POLL))
      continue
    fi
    log "exit codes of the workers: ${states[*]}"
    RESULT=0
    for code in "${states[@]}"; do
      if [[ $code == 2 ]]; then RESULT=2; return 0; fi
      [[ $RESULT != 0 || $code == 0 ]] || RESULT=$code
    done
    return 0
  done
}

# ---- main loop ---------------------------------------------------------------------

on_interrupt() {
  log "stopped watching. The job may still run on the workers; to stop it:"
  log "  gcloud compute tpus tpu-vm ssh $TPU ${WHERE[*]} --worker=all --command='kill \$(cat ~/mesp_jax_job/pid)'"
  log "and to delete the slice:"
  if ((QUEUED)); then
    log "  gcloud compute tpus queued-resources delete $QR_NAME ${WHERE[*]} --force"
  else
    log "  gcloud compute tpus tpu-vm delete $TPU ${WHERE[*]}"
  fi
  exit 130
}

# One round: slice up, project installed, job launched and followed; sets
# RESULT.
attempt() {
  if ! ensure_slice; then RESULT=slice-unusable; return 0; fi
  if ((NEED_INSTALL)); then
    if ! install_project; then RESULT=install-failed; return 0; fi
    NEED_INSTALL=0
  fi
  if [[ -n $BUCKET ]] && ! mount_bucket; then RESULT=mount-failed; return 0; fi
  if ! launch_job; then RESULT=launch-failed; return 0; fi
  follow_job
  job_result
}

main() {
  parse_args "$@"
  configure
  trap on_interrupt INT
  local restarts=0
  LAUNCHES=0
  NEED_INSTALL=1  # install once per invocation, and again on every new slice
  while :; do
    attempt
    case $RESULT in
      0)
        log "the run finished (exit 0)"
        if [[ $DELETE_AFTER == 1 ]]; then delete_slice || true; fi
        exit 0 ;;
      2)
        log "the run stopped with exit code 2: a user error (config, data or" \
          "checkpoint; see the log above). Not relaunching."
        exit 2 ;;
    esac
    restarts=$((restarts + 1))
    if ((restarts > MAX_RESTARTS)); then
      log "giving up after $MAX_RESTARTS relaunches (last: $RESULT)"
      [[ $RESULT =~ ^[0-9]+$ ]] && exit "$RESULT"
      exit 1
    fi
    log "the job ended with: $RESULT; relaunching ($restarts/$MAX_RESTARTS)" \
      "in ${RETRY_SLEEP}s; it resumes from the newest checkpoint in $WORKDIR"
    nap "$RETRY_SLEEP"
  done
}

main "$@"
