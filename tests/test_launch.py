"""The pod and cluster launchers (launch/tpu_pod.sh, launch/slurm_gpu.sbatch).

No network, no gcloud, no SLURM. The dry runs run with a `gcloud`, `scontrol`
and `srun` on PATH that fail loudly, so a test fails if a dry run calls one.
The other tests run the scripts for real against small fakes written here: a
`gcloud` whose "slice" is a few worker folders on this machine (the remote
commands really run, with bash, in each worker's folder as $HOME), and an
`srun`/`scontrol` pair that runs the tasks locally. For the pod, fakes of
`gcsfuse`, `mountpoint` and `sudo` record mounts per worker instead of
mounting anything (and nothing runs as root).
"""

import os
import re
import shutil
import signal
import stat
import subprocess
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO_ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO_ROOT, "launch", "slurm_gpu.sbatch")

CONFIG = "configs/arvm_imagenet.py"
WORKDIR = "gs://bucket/runs/arvm"
MOUNTED = "/gcs/bucket/runs/arvm"  # WORKDIR as the job sees it on the workers
GCSFUSE_FLAGS = ["--implicit-dirs", "--rename-dir-limit=200000",
                 "--metadata-cache-ttl-secs=0",
                 "--metadata-cache-negative-ttl-secs=0"]
EXTRA = ["--config.train.steps=10", "--config.seed=3"]
POD_ENV = {"TPU": "my-pod", "ZONE": "us-central2-b", "ACCELERATOR": "v5p-128",
           "REPO": "https://github.com/me/mesp_jax.git"}

LOUD_FAKE = "#!/bin/sh\necho \"FAKE $(basename \"$0\") CALLED: $*\" >&2\nexit 99\n"


def write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def loud_bin(tmp_path):
  """A folder with a gcloud, scontrol and srun that fail loudly."""
  bin_dir = tmp_path / "loud_bin"
  bin_dir.mkdir()
  for name in ("gcloud", "scontrol", "srun"):
    write_exe(bin_dir / name, LOUD_FAKE)
  return bin_dir


def run_script(script, args, env, path_dirs=(), timeout=60):
  full_env = {"PATH": os.pathsep.join([*map(str, path_dirs), os.environ["PATH"]]),
              "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8", **env}
  return subprocess.run(["bash", script, *args], env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def traced(result):
  """The commands a run printed ("+ " lines)."""
  return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


def check_no_fake_called(result):
  assert "FAKE" not in result.stdout + result.stderr, result.stderr


# ---- tpu_pod.sh, dry run ---------------------------------------------------------


def pod_dry_run(loud_bin, args=(CONFIG, WORKDIR, *EXTRA), **env):
  result = run_script(TPU_POD, ["--dry-run", *args], {**POD_ENV, **env},
                      path_dirs=[loud_bin])
  check_no_fake_called(result)
  return result


def job_lines(cmds):
  return [c for c in cmds if "mesp_jax.main" in c]


def mount_lines(cmds):
  return [c for c in cmds if "mountpoint -q" in c]


def install_lines(cmds):
  return [c for c in cmds if "pip install" in c]


def steps(cmds):
  """The install, mount and job commands, in the order they ran."""
  kinds = {"install": install_lines, "mount": mount_lines, "job": job_lines}
  return [kind for c in cmds for kind, pick in kinds.items() if pick([c])]


def check_mount_line(mount, mount_point="/gcs/bucket", bucket="bucket"):
  assert "tpu-vm ssh my-pod" in mount and "--worker=all" in mount
  assert f"M={mount_point};" in mount
  # Skipped when mounted (and answering) already; else the folder, then gcsfuse.
  assert 'if mountpoint -q "$M" && timeout 120 ls -f "$M"' in mount
  assert 'mkdir -p "$M"' in mount
  assert (f"gcsfuse {' '.join(GCSFUSE_FLAGS)} --log-file=$J/gcsfuse.log "
          f'{bucket} "$M"') in mount


def test_pod_dry_run_one_launch(loud_bin):
  result = pod_dry_run(loud_bin)
  assert result.returncode == 0, result.stderr
  cmds = traced(result)
  create = [c for c in cmds if "queued-resources create" in c]
  assert len(create) == 1
  for part in ("my-pod-qr", "--node-id=my-pod", "--zone=us-central2-b",
               "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5"):
    assert part in create[0]
  assert "--spot" not in create[0]
  describe = [c for c in cmds if "queued-resources describe" in c]
  assert describe and all("value(state.state)" in c for c in describe)
  install = [c for c in cmds if "pip install" in c]
  assert len(install) == 1
  assert "tpu-vm ssh my-pod" in install[0] and "--worker=all" in install[0]
  assert "git clone -q https://github.com/me/mesp_jax.git" in install[0]
  assert '"jax[tpu]" -e .' in install[0]
  # gcsfuse is installed from its apt repository when missing (or old).
  assert "apt-get install" in install[0] and "gcsfuse" in install[0]
  assert "gcsfuse is not installed on" in install[0]
  (mount,) = mount_lines(cmds)
  check_mount_line(mount)
  (job,) = job_lines(cmds)
  assert "--worker=all" in job
  # The job gets the mounted path, never the gs:// URI.
  assert (f"python3 -m mesp_jax.main --multihost --config={CONFIG} "
          f"--workdir={MOUNTED} {' '.join(EXTRA)}") in job
  assert "gs://" not in job
  assert "job.log" in job
  stream = [c for c in cmds if "tail " in c]
  assert len(stream) == 1 and "--worker=0" in stream[0] and "job.log" in stream[0]
  # The order: create, install, mount, launch, stream worker 0.
  order = [cmds.index(c) for c in (create[0], install[0], mount, job, stream[0])]
  assert order == sorted(order)
  # The dry run tells where the bucket goes and what the job's workdir is.
  assert "mounting gs://bucket at /gcs/bucket" in result.stderr
  assert f"the job's workdir: {MOUNTED}" in result.stderr


def test_pod_dry_run_relaunches_the_same_command(loud_bin):
  result = pod_dry_run(loud_bin, DRY_RUN_EXIT_CODES="75,0")
  assert result.returncode == 0, result.stderr
  cmds = traced(result)
  jobs = job_lines(cmds)
  assert len(jobs) == 2 and jobs[0] == jobs[1]
  assert f"--workdir={MOUNTED} " in jobs[0]
  # The slice stayed up: created once, installed once, streamed twice; the
  # mount (skipped on a worker where it is mounted) comes before each launch,
  # since a worker VM may have restarted in between.
  assert sum("queued-resources create" in c for c in cmds) == 1
  assert steps(cmds) == ["install", "mount", "job", "mount", "job"]
  mounts = mount_lines(cmds)
  assert mounts[0] == mounts[1]
  check_mount_line(mounts[1])
  assert sum("tail " in c for c in cmds) == 2
  assert "relaunching (1/20)" in result.stderr


def test_pod_dry_run_user_error_is_not_relaunched(loud_bin):
  result = pod_dry_run(loud_bin, DRY_RUN_EXIT_CODES="2")
  assert result.returncode == 2
  assert len(job_lines(traced(result))) == 1
  assert "Not relaunching" in result.stderr


@pytest.mark.parametrize("max_restarts", ["0", "2"])
def test_pod_dry_run_max_restarts(loud_bin, max_restarts):
  result = pod_dry_run(loud_bin, DRY_RUN_EXIT_CODES="75",
                       MAX_RESTARTS=max_restarts)
  assert result.returncode == 75
  assert len(job_lines(traced(result))) == int(max_restarts) + 1
  assert f"giving up after {max_restarts} relaunches" in result.stderr


def test_pod_dry_run_preempted_slice_is_recreated(loud_bin):
  result = pod_dry_run(loud_bin, DRY_RUN_EXIT_CODES="preempt,0", SPOT="1")
  assert result.returncode == 0, result.stderr
  cmds = traced(result)
  creates = [c for c in cmds if "queued-resources create" in c]
  assert len(creates) == 2 and all("--spot" in c for c in creates)
  delete = [c for c in cmds if "queued-resources delete" in c]
  assert len(delete) == 1 and "--force" in delete[0]
  assert cmds.index(delete[0]) > cmds.index(job_lines(cmds)[0])
  # A new slice has nothing installed: install again, mount again, then the
  # same job.
  assert steps(cmds) == ["install", "mount", "job"] * 2
  jobs = job_lines(cmds)
  assert len(jobs) == 2 and jobs[0] == jobs[1]


def test_pod_dry_run_reuses_an_existing_slice(loud_bin):
  result = pod_dry_run(loud_bin, DRY_RUN_STATE="ACTIVE", REF="v1.2")
  assert result.returncode == 0, result.stderr
  cmds = traced(result)
  assert not any("create" in c for c in cmds)
  (install,) = [c for c in cmds if "pip install" in c]
  assert "origin/v1.2" in install


@pytest.mark.parametrize("accelerator,runtime", [
    ("v6e-256", "v2-alpha-tpuv6e"), ("v5litepod-64", "v2-alpha-tpuv5-lite"),
    ("v4-32", "tpu-ubuntu2204-base")])
def test_pod_dry_run_default_runtime(loud_bin, accelerator, runtime):
  result = pod_dry_run(loud_bin, ACCELERATOR=accelerator)
  assert result.returncode == 0, result.stderr
  (create,) = [c for c in traced(result) if "create" in c]
  assert f"--runtime-version={runtime}" in create


def test_pod_dry_run_without_queued_resources(loud_bin):
  result = pod_dry_run(loud_bin, QUEUED="0", RUNTIME="my-runtime", PROJECT="p1")
  assert result.returncode == 0, result.stderr
  cmds = traced(result)
  assert not any("queued-resources" in c for c in cmds)
  (create,) = [c for c in cmds if "tpu-vm create" in c]
  assert "--version=my-runtime" in create and "--project=p1" in create
  assert any("tpu-vm describe my-pod" in c for c in cmds)


def test_pod_refuses_a_local_workdir(loud_bin):
  result = pod_dry_run(loud_bin, args=(CONFIG, "/tmp/runs/arvm"))
  assert result.returncode == 2
  assert "gs://" in result.stderr and "/tmp/runs/arvm" in result.stderr
  assert not traced(result)


@pytest.mark.parametrize("workdir", [
    "gs://", "gs:///runs", "gs://Bucket/runs", "gs://b/runs",
    "gs://bucket/../runs", "gs://bucket/a//b", "gs://bucket/./a"])
def test_pod_refuses_a_bad_gs_workdir(loud_bin, workdir):
  result = pod_dry_run(loud_bin, args=(CONFIG, workdir))
  assert result.returncode == 2
  assert workdir in result.stderr
  assert not traced(result)


def test_pod_local_workdir_allowed_is_not_mounted(loud_bin):
  result = pod_dry_run(loud_bin, args=(CONFIG, "/shared/runs/arvm"),
                       ALLOW_LOCAL_WORKDIR="1")
  assert result.returncode == 0, result.stderr
  cmds = traced(result)
  assert not mount_lines(cmds)
  assert not any("gcsfuse" in c for c in cmds)
  (job,) = job_lines(cmds)
  assert "--workdir=/shared/runs/arvm > " in job


@pytest.mark.parametrize("workdir,mounted", [
    ("gs://bucket", "/gcs/bucket"), ("gs://bucket/", "/gcs/bucket"),
    ("gs://my.bucket_2/a/b/", "/gcs/my.bucket_2/a/b")])
def test_pod_dry_run_workdir_paths(loud_bin, workdir, mounted):
  result = pod_dry_run(loud_bin, args=(CONFIG, workdir))
  assert result.returncode == 0, result.stderr
  cmds = traced(result)
  (mount,) = mount_lines(cmds)
  bucket = mounted.split("/")[2]
  check_mount_line(mount, f"/gcs/{bucket}", bucket)
  (job,) = job_lines(cmds)
  assert f"--workdir={mounted} > " in job


@pytest.mark.parametrize("root", ["/mnt/buckets", "/mnt/buckets/"])
def test_pod_dry_run_gcs_mount_root(loud_bin, root):
  result = pod_dry_run(loud_bin, GCS_MOUNT_ROOT=root, DRY_RUN_EXIT_CODES="75,0")
  assert result.returncode == 0, result.stderr
  cmds = traced(result)
  mounts = mount_lines(cmds)
  assert len(mounts) == 2
  for mount in mounts:
    check_mount_line(mount, "/mnt/buckets/bucket")
  assert not any("/gcs/" in c for c in cmds)
  for job in job_lines(cmds):
    assert "--workdir=/mnt/buckets/bucket/runs/arvm " in job


@pytest.mark.parametrize("root", ["gcs", "/", "//"])
def test_pod_refuses_a_relative_gcs_mount_root(loud_bin, root):
  result = pod_dry_run(loud_bin, GCS_MOUNT_ROOT=root)
  assert result.returncode == 2
  assert "GCS_MOUNT_ROOT" in result.stderr
  assert not traced(result)


def test_pod_needs_its_variables(loud_bin):
  result = run_script(TPU_POD, ["--dry-run", CONFIG, WORKDIR], {"TPU": "x"},
                      path_dirs=[loud_bin])
  assert result.returncode == 2
  assert "ZONE" in result.stderr and "REPO" in result.stderr


def test_pod_help(loud_bin):
  result = run_script(TPU_POD, ["--help"], {}, path_dirs=[loud_bin])
  assert result.returncode == 0
  assert "Usage:" in result.stdout and "MAX_RESTARTS" in result.stdout
  assert "GCS_MOUNT_ROOT" in result.stdout and "gcsfuse" in result.stdout
  check_no_fake_called(result)


# ---- tpu_pod.sh against a fake gcloud -------------------------------------------
# The fake's slice: FAKE_WORKERS folders under FAKE_DIR, one per worker, each
# the worker's $HOME; its state file holds the queued resource's state.

FAKE_GCLOUD = r"""#!/usr/bin/env bash
D=$FAKE_DIR
printf '%s\n' "$*" >> "$D/calls"
worker= command=
for a in "$@"; do
  case $a in
    --worker=*) worker=${a#--worker=} ;;
    --command=*) command=${a#--command=} ;;
  esac
done
case "$1 $2 $3 $4" in
  "compute tpus queued-resources describe")
    if [ -s "$D/state" ]; then cat "$D/state"
    else echo "ERROR: (gcloud) NOT_FOUND: no such queued resource" >&2; exit 1; fi ;;
  "compute tpus queued-resources create")
    rm -rf "$D"/worker*; echo ACTIVE > "$D/state" ;;  # new workers, empty disks
  "compute tpus queued-resources delete") rm -f "$D/state" ;;
  "compute tpus tpu-vm ssh")
    [ "$(cat "$D/state")" = ACTIVE ] || { echo "ssh: unreachable" >&2; exit 255; }
    workers=$worker
    [ "$worker" != all ] || workers=$(seq 0 $((FAKE_WORKERS - 1)))
    rc=0
    for w in $workers; do
      mkdir -p "$D/worker$w"
      (cd "$D/worker$w" && HOME="$D/worker$w" WORKER=$w bash -c "$command") || rc=$?
    done
    exit $rc ;;
  *) echo "fake gcloud: unexpected command: $*" >&2; exit 99 ;;
esac
"""

# python3 on the workers: pip does nothing; the job prints a line, records
# whether its --workdir was under a mounted bucket on its worker, and exits
# with the next code of FAKE_CODES (per worker); "preempt" suspends the slice,
# "reboot" loses the worker's mounts (as a VM that restarted would).
FAKE_PYTHON3 = r"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then echo "$*" >> "$HOME/pip.log"; exit 0; fi
count="$FAKE_DIR/launches.$WORKER"
n=$(( $(cat "$count" 2>/dev/null || echo 0) + 1 )); echo $n > "$count"
echo "worker $WORKER launch $n in $PWD: $*"
echo "$*" >> "$FAKE_DIR/job_args.$WORKER"
wd=
for a in "$@"; do case $a in --workdir=*) wd=${a#--workdir=} ;; esac; done
mounted=no
if [ -f "$HOME/.mounts" ]; then
  while read -r m; do case "$wd/" in "$m"/*) mounted=yes ;; esac; done < "$HOME/.mounts"
fi
echo "$mounted" >> "$FAKE_DIR/mounted.$WORKER"
code=$(echo "$FAKE_CODES" | cut -d, -f$n)
sleep 1
if [ "$code" = preempt ]; then
  [ "$WORKER" != 0 ] || echo SUSPENDED > "$FAKE_DIR/state"
  exit 143
fi
if [ "$code" = reboot ]; then rm -f "$HOME/.mounts"; exit 143; fi
exit "${code:-0}"
"""

# gcsfuse, mountpoint and fusermount on the workers: a mount is a line in the
# worker's $HOME/.mounts (a new slice has empty workers, so no mounts).
# gcsfuse records its arguments and needs an existing mount folder, like the
# real one. sudo records what it was asked and fails: nothing runs as root.
FAKE_GCSFUSE = r"""#!/usr/bin/env bash
if [ "$1" = --version ]; then
  echo "gcsfuse version 3.9.0 (Go version go1.24)"; exit 0
fi
echo "$*" >> "$FAKE_DIR/gcsfuse.$WORKER"
mp=${*: -1}
[ -d "$mp" ] || { echo "gcsfuse: $mp is not a folder" >&2; exit 1; }
echo "$mp" >> "$HOME/.mounts"
"""
FAKE_MOUNTPOINT = r"""#!/usr/bin/env bash
[ "$1" != -q ] || shift
grep -qxF -- "$1" "$HOME/.mounts" 2>/dev/null
"""
FAKE_FUSERMOUNT = r"""#!/usr/bin/env bash
mp=${*: -1}
grep -qxF -- "$mp" "$HOME/.mounts" 2>/dev/null || exit 1
grep -vxF -- "$mp" "$HOME/.mounts" > "$HOME/.mounts.new"
mv "$HOME/.mounts.new" "$HOME/.mounts"
"""
FAKE_SUDO = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/sudo.$WORKER"
exit 1
"""


@pytest.fixture
def fake_pod(tmp_path):
  bin_dir = tmp_path / "fake_bin"
  bin_dir.mkdir()
  write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
  write_exe(bin_dir / "python3", FAKE_PYTHON3)
  write_exe(bin_dir / "gcsfuse", FAKE_GCSFUSE)
  write_exe(bin_dir / "mountpoint", FAKE_MOUNTPOINT)
  write_exe(bin_dir / "fusermount", FAKE_FUSERMOUNT)
  write_exe(bin_dir / "fusermount3", FAKE_FUSERMOUNT)
  write_exe(bin_dir / "sudo", FAKE_SUDO)
  fake_dir = tmp_path / "pod"
  fake_dir.mkdir()
  # REPO: a local git repository, so that the workers' clone needs no network.
  repo = tmp_path / "repo"
  repo.mkdir()
  (repo / "README.md").write_text("fake\n")
  git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(repo)]
  for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
    subprocess.run(git + cmd, check=True, capture_output=True)
  return bin_dir, fake_dir, repo


def run_fake_pod(fake_pod, codes, workers=2, workdir=WORKDIR, **env):
  bin_dir, fake_dir, repo = fake_pod
  # The workers' mount root: a folder here (the default, /gcs, needs root).
  env = {**POD_ENV, "REPO": str(repo), "FAKE_DIR": str(fake_dir),
         "FAKE_WORKERS": str(workers), "FAKE_CODES": codes, "POLL": "1",
         "RETRY_SLEEP": "0", "STRAGGLER_WAIT": "5",
         "GCS_MOUNT_ROOT": str(fake_dir / "gcs"), **env}
  result = run_script(TPU_POD, [CONFIG, workdir, *EXTRA], env,
                      path_dirs=[bin_dir], timeout=120)
  calls = (fake_dir / "calls").read_text().splitlines()
  return result, calls


def lines(fake_dir, name):
  path = fake_dir / name
  return path.read_text().splitlines() if path.exists() else []


def launches(fake_dir, worker):
  return lines(fake_dir, f"job_args.{worker}")


def mount_calls(calls):
  """The ssh calls that (re)mount the bucket, one per launch."""
  return [c for c in calls if "tpu-vm ssh" in c and "mountpoint -q" in c]


def test_pod_real_run_resumes_after_exit_75(fake_pod):
  result, calls = run_fake_pod(fake_pod, "75,0")
  fake_dir = fake_pod[1]
  assert result.returncode == 0, result.stdout + result.stderr
  assert sum(c.startswith("compute tpus queued-resources create") for c in calls) == 1
  mount_point = fake_dir / "gcs" / "bucket"
  assert mount_point.is_dir()
  # The mount step ran before each launch, but gcsfuse ran once per worker:
  # the second time the bucket was mounted already.
  assert len(mount_calls(calls)) == 2
  for worker in (0, 1):
    home = fake_dir / f"worker{worker}"
    assert lines(fake_dir, f"gcsfuse.{worker}") == [
        f"{' '.join(GCSFUSE_FLAGS)} --log-file={home}/mesp_jax_job/gcsfuse.log "
        f"bucket {mount_point}"]
    assert lines(fake_dir, f"mounted.{worker}") == ["yes", "yes"]
    assert not lines(fake_dir, f"sudo.{worker}")  # gcsfuse was there already
    args = launches(fake_dir, worker)
    assert len(args) == 2 and args[0] == args[1]
    assert args[0] == (f"-m mesp_jax.main --multihost --config={CONFIG} "
                       f"--workdir={mount_point}/runs/arvm {' '.join(EXTRA)}")
    assert (fake_dir / f"worker{worker}" / "mesp_jax" / "README.md").exists()
    assert (fake_dir / f"worker{worker}" / "mesp_jax_job" / "exit").read_text() == "0\n"
  # Worker 0's log was streamed (from the job's folder, the checkout);
  # worker 1's was not.
  assert "worker 0 launch 1 in " in result.stdout
  assert "worker 0 launch 2 in " in result.stdout
  assert "worker 1 launch" not in result.stdout
  assert f"{fake_dir}/worker0/mesp_jax:" in result.stdout
  # The first launch's log was kept.
  old = list((fake_dir / "worker0" / "mesp_jax_job").glob("job.*.log"))
  assert len(old) == 1 and "launch 1" in old[0].read_text()


def test_pod_real_run_stops_on_exit_2(fake_pod):
  result, _ = run_fake_pod(fake_pod, "2,0")
  assert result.returncode == 2, result.stderr
  assert len(launches(fake_pod[1], 0)) == 1


def test_pod_real_run_recreates_a_preempted_slice(fake_pod):
  result, calls = run_fake_pod(fake_pod, "preempt,0")
  fake_dir = fake_pod[1]
  assert result.returncode == 0, result.stdout + result.stderr
  assert sum(c.startswith("compute tpus queued-resources create") for c in calls) == 2
  assert sum(c.startswith("compute tpus queued-resources delete") for c in calls) == 1
  assert "SUSPENDED" in result.stderr
  for worker in (0, 1):
    args = launches(fake_dir, worker)
    assert len(args) == 2 and args[0] == args[1]
    # Reinstalled on the new workers, and the bucket mounted there again.
    assert (fake_dir / f"worker{worker}" / "mesp_jax" / "README.md").exists()
    assert len(lines(fake_dir, f"gcsfuse.{worker}")) == 2
    assert lines(fake_dir, f"mounted.{worker}") == ["yes", "yes"]


def test_pod_real_run_remounts_after_a_worker_restart(fake_pod):
  # The first launch ends as a restarted VM does: the slice is still up, the
  # project is still installed, but the worker has lost its mounts.
  result, calls = run_fake_pod(fake_pod, "reboot,0")
  fake_dir = fake_pod[1]
  assert result.returncode == 0, result.stdout + result.stderr
  assert sum(c.startswith("compute tpus queued-resources create") for c in calls) == 1
  assert sum("pip install" in c for c in calls) == 1
  assert len(mount_calls(calls)) == 2
  for worker in (0, 1):
    assert len(lines(fake_dir, f"gcsfuse.{worker}")) == 2
    assert lines(fake_dir, f"mounted.{worker}") == ["yes", "yes"]


def test_pod_real_run_local_workdir_is_not_mounted(fake_pod, tmp_path):
  workdir = str(tmp_path / "shared" / "runs")
  result, calls = run_fake_pod(fake_pod, "0", workers=1, workdir=workdir,
                               ALLOW_LOCAL_WORKDIR="1")
  fake_dir = fake_pod[1]
  assert result.returncode == 0, result.stdout + result.stderr
  assert not mount_calls(calls)
  assert not lines(fake_dir, "gcsfuse.0")
  (args,) = launches(fake_dir, 0)
  assert f"--workdir={workdir} " in args


@pytest.mark.skipif(shutil.which("gcsfuse") is not None,
                    reason="a real gcsfuse is on PATH")
def test_pod_real_run_without_gcsfuse(fake_pod):
  bin_dir, fake_dir, _ = fake_pod
  (bin_dir / "gcsfuse").unlink()
  result, calls = run_fake_pod(fake_pod, "0", workers=1, MAX_RESTARTS="0")
  assert result.returncode == 1
  # The install step tried to install it from gcsfuse's apt repository (the
  # fake sudo refuses), then said what to install; nothing was launched.
  (sudo,) = lines(fake_dir, "sudo.0")
  assert "apt-get install" in sudo and "gcsfuse" in sudo
  assert "packages.cloud.google.com/apt" in sudo
  assert "gcsfuse is not installed on" in result.stderr
  assert "install the Debian package gcsfuse" in result.stderr
  assert "install-failed" in result.stderr
  assert not mount_calls(calls)
  assert not launches(fake_dir, 0)


def test_pod_real_run_max_restarts(fake_pod):
  result, _ = run_fake_pod(fake_pod, "1", MAX_RESTARTS="1", workers=1)
  assert result.returncode == 1
  assert len(launches(fake_pod[1], 0)) == 2


# ---- slurm_gpu.sbatch ------------------------------------------------------------

SLURM_ARGS = ["configs/arvm_cifar10.py", "/shared/runs/arvm", "--config.seed=3"]


def test_slurm_is_an_sbatch_script():
  with open(SLURM) as f:
    text = f.read()
  header = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
  assert "--requeue" in header
  assert any(h.startswith("--signal=B:TERM@") for h in header)
  assert "--open-mode=append" in header
  # sbatch reads #SBATCH lines only before the first command.
  first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1)
                       if line.strip() and not line.startswith("#"))
  last_sbatch = max(i for i, line in enumerate(text.splitlines())
                    if line.startswith("#SBATCH"))
  assert last_sbatch < first_command


def slurm_dry_run(loud_bin, **env):
  env = {"DRY_RUN": "1", "DRY_RUN_HOSTS": "gpu-a gpu-b", "SLURM_NNODES": "2",
         "SLURM_NTASKS": "16", **env}
  result = run_script(SLURM, SLURM_ARGS, env, path_dirs=[loud_bin])
  check_no_fake_called(result)
  return result


def test_slurm_dry_run(loud_bin):
  result = slurm_dry_run(loud_bin)
  assert result.returncode == 0, result.stderr
  cmds = traced(result)
  srun = [c for c in cmds if c.startswith("srun ")]
  assert len(srun) == 1
  assert "--process_id=$SLURM_PROCID" in srun[0]
  tasks = [c for c in cmds if c.startswith("[task ")]
  assert len(tasks) == 16
  for i, task in enumerate(tasks):
    assert task.startswith(f"[task {i} on {'gpu-a' if i < 8 else 'gpu-b'}]")
    assert f"--process_id={i} " in task
    for part in ("-m mesp_jax.main --multihost",
                 "--coordinator_address=gpu-a:12355", "--num_processes=16",
                 "--config=configs/arvm_cifar10.py", "--workdir=/shared/runs/arvm",
                 "--config.seed=3"):
      assert part in task
  assert not any("requeue" in c for c in cmds)


def test_slurm_dry_run_requeues_after_75_not_after_2(loud_bin):
  result = slurm_dry_run(loud_bin, DRY_RUN_EXIT_CODE="75", SLURM_JOB_ID="42",
                         PORT="23456")
  assert result.returncode == 75
  cmds = traced(result)
  assert "scontrol requeue 42" in cmds
  assert all("--coordinator_address=gpu-a:23456" in c
             for c in cmds if c.startswith("[task "))
  result = slurm_dry_run(loud_bin, DRY_RUN_EXIT_CODE="2")
  assert result.returncode == 2
  assert not any("requeue" in c for c in traced(result))


def test_slurm_dry_run_defaults(loud_bin):
  result = run_script(SLURM, SLURM_ARGS, {"DRY_RUN": "1"}, path_dirs=[loud_bin])
  check_no_fake_called(result)
  assert result.returncode == 0, result.stderr
  tasks = [c for c in traced(result) if c.startswith("[task ")]
  assert len(tasks) == 8 and "--coordinator_address=node1:12355" in tasks[0]


# A fake srun runs SLURM_NTASKS tasks here and forwards SIGTERM to them; the
# fake scontrol expands the node list and records requeues. The task's
# "python" records its arguments and waits for SIGTERM (exit 75) with
# FAKE_MODE=wait, otherwise exits with FAKE_CODE.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for p in "${pids[@]}"; do
  while kill -0 "$p" 2>/dev/null; do wait "$p"; done
  wait "$p"; c=$?; ((c > rc)) && rc=$c
done
exit $rc
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo gpu-a; echo gpu-b ;;
  "requeue "*) echo "$2" >> "$FAKE_DIR/requeued" ;;
  *) exit 99 ;;
esac
"""
FAKE_TASK = r"""#!/usr/bin/env bash
echo "$*" > "$FAKE_DIR/task.$SLURM_PROCID"
if [ "$FAKE_MODE" = wait ]; then
  trap 'kill $sleeper; echo term > "$FAKE_DIR/term.$SLURM_PROCID"; exit 75' TERM
  sleep 60 & sleeper=$!
  wait
fi
exit "${FAKE_CODE:-0}"
"""


@pytest.fixture
def fake_slurm(tmp_path):
  bin_dir = tmp_path / "slurm_bin"
  bin_dir.mkdir()
  write_exe(bin_dir / "srun", FAKE_SRUN)
  write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
  write_exe(bin_dir / "python", FAKE_TASK)
  fake_dir = tmp_path / "slurm"
  fake_dir.mkdir()
  env = {"FAKE_DIR": str(fake_dir), "SLURM_JOB_ID": "77",
         "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2",
         "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2",
         "PYTHON": str(bin_dir / "python")}
  return bin_dir, fake_dir, env


@pytest.mark.parametrize("code,requeued", [("0", False), ("2", False), ("1", True)])
def test_slurm_real_run(fake_slurm, code, requeued):
  bin_dir, fake_dir, env = fake_slurm
  result = run_script(SLURM, SLURM_ARGS, {**env, "FAKE_CODE": code},
                      path_dirs=[bin_dir])
  assert result.returncode == int(code), result.stderr
  for i in range(4):
    args = (fake_dir / f"task.{i}").read_text()
    assert args.startswith("-m mesp_jax.main --multihost "
                           "--coordinator_address=gpu-a:12355 --num_processes=4 "
                           f"--process_id={i} ")
  assert (fake_dir / "requeued").exists() == requeued


def test_slurm_real_run_gives_up_after_max_restarts(fake_slurm):
  bin_dir, fake_dir, env = fake_slurm
  result = run_script(SLURM, SLURM_ARGS, {**env, "FAKE_CODE": "1",
                                          "SLURM_RESTART_COUNT": "3",
                                          "MAX_RESTARTS": "3"},
                      path_dirs=[bin_dir])
  assert result.returncode == 1
  assert not (fake_dir / "requeued").exists()


def test_slurm_forwards_sigterm_and_requeues(fake_slurm):
  bin_dir, fake_dir, env = fake_slurm
  full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
              **env, "FAKE_MODE": "wait"}
  proc = subprocess.Popen(["bash", SLURM, *SLURM_ARGS], env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 30
    while not all((fake_dir / f"task.{i}").exists() for i in range(4)):
      assert time.monotonic() < deadline, "the tasks did not start"
      time.sleep(0.1)
    time.sleep(0.5)  # let the tasks set their traps
    proc.send_signal(signal.SIGTERM)  # what SLURM sends before the time limit
    _, stderr = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 75, stderr
  assert all((fake_dir / f"term.{i}").exists() for i in range(4))
  assert (fake_dir / "requeued").read_text() == "77\n"
  assert "SIGTERM" in stderr
