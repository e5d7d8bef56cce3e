"""Ahead-of-time check: ``python -m mesp_jax.aot --config=FILE[:variant]
--topology=NAME [--config.a.b=value ...]``.

Lowers and compiles the real train step of a BL-AE or ARVM config (and, for
the ARVM, the sampler's one-token decode step) for a machine that is not
here: a Cloud TPU slice, compiled from this CPU with libtpu (``pip install
-e .[tpu]``), or ``cpu:N`` fake CPU devices (no libtpu needed). Nothing runs;
XLA's own analyses of the compiled programs give

* the parameter count, and per-device argument / output / temporary memory
  (``memory_analysis``) against the chip's HBM,
* FLOPs and bytes accessed per step (``cost_analysis``; per device, after
  SPMD partitioning),
* a predicted step time at the chip's published peaks: the roofline
  ``max(FLOPs / peak FLOP/s, bytes / peak bandwidth)``. It ignores
  collectives and overheads, so it is a lower bound on the real step,
* compile time, and with ``--compare_scan`` / ``--compare_remat=POLICY``
  the same for the ARVM with ``arvm.scan_layers`` flipped / ``arvm.remat``
  set.

XLA's cost analysis counts the body of a loop once. A program with a loop
over the layers (``scan_layers``) or over micro-batches
(``grad_accum_steps > 1``) therefore reports a fraction of its FLOPs; the
report marks those rows and leaves their prediction out.

A config that does not fit fails here, at compile time, with the memory it
needs and the memory the chip has (exit code 2).

Topologies: ``v4-32``, ``v5e-256``, ``v5p-128``, ``v6e-256`` (and other
sizes of those families, e.g. ``v5e-4``), or ``cpu:N``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant'.",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "cpu:8", "v4-32, v5e-256, v5p-128, v6e-256 (other sizes of "
    "those families too) or cpu:N")
_LATENT = flags.DEFINE_string(
    "latent", "", "ARVM configs: the token grid HxWxC (latent height, width, "
    "bits per position), e.g. 16x16x24; default: read from the tokens "
    "manifest in config.inputs.tokens_dir")
_COMPARE_SCAN = flags.DEFINE_bool(
    "compare_scan", False, "ARVM: also compile with arvm.scan_layers flipped")
_COMPARE_REMAT = flags.DEFINE_string(
    "compare_remat", "", "ARVM: also compile with arvm.remat set to this "
    "policy (none, full, dots, dots_no_batch)")
_SAMPLER = flags.DEFINE_bool("sampler", True,
                             "ARVM: also compile the sampler's decode step")

GiB = 2**30


class AotError(Exception):
  """A user error of the ahead-of-time check (message says what to do)."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of a TPU generation."""
  family: str  # the name in jax's topology strings
  peak_flops: float  # bf16 dense FLOP/s
  hbm_bytes: float
  hbm_bandwidth: float  # bytes/s
  cores_in_name: bool  # 'v4-32' counts TensorCores (2 per chip), not chips
  dims: int  # torus dimensions


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1.2e12, True, 3),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, False, 2),
    "v5p": Chip("v5", 459e12, 95 * GiB, 2.765e12, True, 3),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1.64e12, False, 2),
}


# Physical torus of a slice by chip count (the shapes Cloud TPU offers).
_TORUS = {
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
        128: "8x16", 256: "16x16"},
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
        128: "4x4x8", 256: "4x8x8", 512: "8x8x8"},
}


@dataclasses.dataclass
class Target:
  """The machine compiled for: its devices and per-device peaks."""
  name: str
  devices: list
  peak_flops: float  # per device
  peak_bytes_per_s: float  # per device
  hbm_bytes: float | None  # per device; None: no fixed limit (CPU)
  note: str


def target(name: str) -> Target:
  """The devices and peaks of topology ``name`` (see the module docstring).

  Raises:
    AotError: unknown name, too few CPU devices, or libtpu missing.
  """
  import jax

  cpu = re.fullmatch(r"cpu:(\d+)", name)
  if cpu:
    n = int(cpu.group(1))
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise AotError(
          f"--topology={name} needs {n} CPU devices but JAX has "
          f"{len(devices)}; run with XLA_FLAGS="
          f"--xla_force_host_platform_device_count={n} (set before JAX starts)")
    from mesp_jax.benchmarks import roofline
    peaks = roofline.measure_peaks()  # all fake devices share these cores
    return Target(name, devices[:n], peaks["flops"] / n, peaks["bytes"] / n,
                  None, f"{n} fake CPU devices; peaks measured here "
                  f"({roofline.describe_peaks(peaks)}), split over them")
  tpu = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
  if not tpu:
    raise AotError(f"--topology={name!r}: use v4-32, v5e-256, v5p-128, "
                   f"v6e-256 (or another size of those) or cpu:N")
  chip = CHIPS[tpu.group(1)]
  count = int(tpu.group(2))
  chips = count // 2 if chip.cores_in_name else count
  torus = _TORUS[chip.dims].get(chips)
  if torus is None:
    raise AotError(f"--topology={name}: {chips} chips is not a slice size "
                   f"here; use one of {sorted(_TORUS[chip.dims])} chips")
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{chip.family}:{torus}")
  except Exception as e:  # noqa: BLE001 - libtpu missing or too old
    raise AotError(
        f"cannot describe TPU topology {chip.family}:{torus} ({type(e).__name__}"
        f": {str(e)[:200]}). Compiling for TPU from this machine needs "
        f"libtpu: pip install -e '.[tpu]'") from None
  devices = list(desc.devices)
  per_chip = len(devices) / chips  # 2 on v4 (one device per TensorCore)
  return Target(name, devices, chip.peak_flops / per_chip,
                chip.hbm_bandwidth / per_chip, chip.hbm_bytes / per_chip,
                f"{chips} chips ({chip.family}:{torus}), {len(devices)} "
                f"devices; published peaks per chip {chip.peak_flops / 1e12:.0f}"
                f" TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s, "
                f"{chip.hbm_bytes / GiB:.0f} GiB HBM")


# ----------------------------------------------------------------------------
# What gets compiled.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
  """One compiled program and XLA's analyses of it (per device)."""
  label: str
  seconds: float  # lower + compile
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  flops: float
  bytes_accessed: float
  loops: bool = False  # a loop body XLA counts once: FLOPs are too low

  @property
  def total_bytes(self) -> int:
    """Peak device memory of the program: arguments + outputs + temporaries
    (donated outputs reuse their arguments' buffers)."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes
            + self.temp_bytes)

  def step_seconds(self, t: Target) -> float:
    return max(self.flops / t.peak_flops, self.bytes_accessed /
               t.peak_bytes_per_s)


def _compile(label: str, lower, loops: bool = False) -> Compiled:
  """Lowers and compiles (``lower() -> jax.stages.Lowered``), timed."""
  from mesp_jax.benchmarks import roofline

  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # noqa: BLE001 - XLA reports OOM as a runtime error
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "exceeds" in text and "memory" in text:
      raise AotError(_oom_message(label, text)) from None
    raise
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  cost = roofline.step_cost(compiled)
  return Compiled(label, seconds, int(mem.argument_size_in_bytes),
                  int(mem.output_size_in_bytes), int(mem.temp_size_in_bytes),
                  int(mem.alias_size_in_bytes), cost["flops"], cost["bytes"],
                  loops)


def _oom_message(label: str, text: str) -> str:
  first = next((line for line in text.splitlines()
                if "RESOURCE_EXHAUSTED" in line or "exceeds" in line), text)
  need = re.search(r"\(([\d.]+\s*[KMGT]?i?B?)\) exceeds available \w+ "
                   r"\(([\d.]+\s*[KMGT]?i?B?)\)", text)
  head = (f"{label} needs {need.group(1)} of device memory and the device "
          f"has {need.group(2)}" if need else
          f"{label} does not fit in device memory")
  return (f"{head}. XLA says: {first.strip()[:600]}\nUse a bigger slice, "
          f"more sharding (config.mesh.fsdp / config.mesh.model), a smaller "
          f"per-device batch (config.train.grad_accum_steps), "
          f"rematerialisation (config.arvm.remat) or bf16 "
          f"(config.arvm.dtype).")


def _latent(config, latent) -> tuple[int, int, int]:
  """``latent`` as (H, W, C): given as a tuple or 'HxWxC', else read from
  the config's tokens manifest."""
  if isinstance(latent, (tuple, list)):
    return tuple(int(v) for v in latent)  # type: ignore[return-value]
  if latent:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", latent)
    if not m:
      raise AotError(f"--latent={latent!r} must be HxWxC, e.g. 16x16x24")
    return tuple(int(v) for v in m.groups())  # type: ignore[return-value]
  from mesp_jax.train import arvm as arvm_train
  try:
    src, _ = arvm_train.token_sources(config)
  except Exception as e:  # noqa: BLE001 - no tokens here
    raise AotError(
        f"an ARVM config needs the token grid: pass --latent=HxWxC (e.g. "
        f"--latent=16x16x24 for configs/blae_imagenet.py's tokens); reading "
        f"config.inputs.tokens_dir failed: {e}") from None
  return (*src.grid, src.bits)


def arvm_programs(config, mesh, latent, with_sampler: bool
                  ) -> tuple[int, list[tuple[str, Any]]]:
  """(parameter count, [(label, lower thunk)]) of an ARVM config."""
  import jax
  import jax.numpy as jnp

  from mesp_jax.base import sharding
  from mesp_jax.models import arvm as arvm_lib
  from mesp_jax.models.blae import count_params
  from mesp_jax.sample import decode, logits
  from mesp_jax.train import arvm as arvm_train
  from mesp_jax.train import loop

  height, width, bits = latent
  model, init_params, loss_fn, eval_fn = arvm_train.functions(
      config, (height, width), bits)
  tp = model.tokens_per_pos
  task = loop.Task("arvm", init_params, loss_fn, eval_fn, {}, None)
  example = {"tokens": jnp.zeros((1, height, width, tp), jnp.int32),
             "label": jnp.zeros((1,), jnp.int32)}
  program = loop.build_program(config, task, example, mesh)
  b = config.train.batch_size
  batch = {"tokens": jax.ShapeDtypeStruct((b, height, width, tp), jnp.int32),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
  loops = (bool(config.arvm.get("scan_layers", False))
           or int(config.train.get("grad_accum_steps", 1)) > 1)
  programs = [(_label("train step", config),
               lambda: program.lower_train_step(batch), loops)]
  if with_sampler:
    scfg = config.sampler
    rows = scfg.batch_size * (2 if scfg.get("cfg_scale", 0.0) > 0 else 1)
    dp = sharding.data_parallel_size(mesh)
    if rows % dp == 0:
      params = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                         sharding=sharding.replicated(mesh)),
          program.abstract.params)
      entries = decode.cache_entries(model, "ring")
      cache = jax.eval_shape(lambda: arvm_lib.init_cache(model, rows, entries))
      rep, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
      cache = {
          "slots": jax.ShapeDtypeStruct(cache["slots"].shape,
                                        cache["slots"].dtype, sharding=rep),
          "layers": jax.tree.map(lambda a: jax.ShapeDtypeStruct(
              a.shape, a.dtype, sharding=logits.cache_sharding(a.ndim, mesh)),
                                 cache["layers"])}
      prev = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=batched)
      labels = (jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=batched)
                if model.num_classes else None)
      slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)

      def step(p, prev_tokens, s, c, lab):
        return model.apply(p, prev_tokens, s, c, lab,
                           method=arvm_lib.ARVM.decode)

      fn = jax.jit(step, donate_argnums=(3,))
      programs.append((f"decode step ({rows} rows, ring cache of {entries})",
                       lambda: fn.lower(params, prev, slot, cache, labels),
                       bool(config.arvm.get("scan_layers", False))))
  return count_params(program.abstract.params), programs


def blae_programs(config, mesh) -> tuple[int, list[tuple[str, Any]]]:
  """(parameter count, [(label, lower thunk)]) of a BL-AE config."""
  import jax
  import jax.numpy as jnp

  from mesp_jax.data import data_channels
  from mesp_jax.models.blae import count_params
  from mesp_jax.train import blae as blae_train
  from mesp_jax.train import loop

  size = config.data.image_size
  shape = (size, size, data_channels(config.data))
  _, init_params, loss_fn, eval_fn = blae_train.functions(config, shape)
  task = loop.Task("blae", init_params, loss_fn, eval_fn, {}, None)
  example = {"image": jnp.zeros((1, *shape), jnp.float32)}
  program = loop.build_program(config, task, example, mesh)
  batch = {"image": jax.ShapeDtypeStruct((config.train.batch_size, *shape),
                                         jnp.float32)}
  loops = int(config.train.get("grad_accum_steps", 1)) > 1
  train = ("train step", lambda: program.lower_train_step(batch), loops)
  return count_params(program.abstract.params), [train]


def _label(name: str, config) -> str:
  a = config.arvm
  parts = ["scan" if a.get("scan_layers", False) else "no scan"]
  if a.get("remat", "none") != "none":
    parts.append(f"remat {a.remat}")
  return f"{name} ({', '.join(parts)})"


def check(config, topology: str, latent: Any = None,
          compare_scan: bool = False,
          compare_remat: str = "", with_sampler: bool = True
          ) -> dict[str, Any]:
  """Compiles ``config``'s programs for ``topology``; returns the report.

  Raises:
    AotError: bad topology, missing libtpu, or a program that does not fit.
  """
  from mesp_jax.base import config as config_lib
  from mesp_jax.base import sharding

  stage = config.get("stage", "")
  if stage not in ("arvm", "blae"):
    raise AotError(f"config.stage={stage!r}: the check compiles 'arvm' and "
                   f"'blae' configs")
  t = target(topology)
  try:
    mesh = sharding.mesh_from_config(config, devices=t.devices)
  except ValueError as e:
    raise AotError(f"{e} ({topology} has {len(t.devices)} devices)") from None
  from mesp_jax.train import loop
  try:
    loop.check_batch(config.train, mesh)
  except ValueError as e:
    raise AotError(f"{e} on {topology}") from None
  if stage == "arvm":
    config_lib.check_fields(config.arvm, "arvm", tuple(config.arvm.keys()))
    latent = _latent(config, latent)
    count, programs = arvm_programs(config, mesh, latent, with_sampler)
    variants = []
    scan = bool(config.arvm.get("scan_layers", False))
    if compare_scan:
      variants.append(dict(scan_layers=not scan))
    if compare_remat:
      variants.append(dict(remat=compare_remat))
      if compare_scan:
        variants.append(dict(scan_layers=not scan, remat=compare_remat))
    for change in variants:
      _, more = arvm_programs(_with(config, **change), mesh, latent, False)
      programs.append(more[0])
  else:
    count, programs = blae_programs(config, mesh)
  results = []
  for label, lower, loops in programs:
    result = _compile(label, lower, loops)
    if t.hbm_bytes is not None and result.total_bytes > t.hbm_bytes:
      raise AotError(
          f"{label} needs {result.total_bytes / GiB:.2f} GiB per device, the "
          f"device has {t.hbm_bytes / GiB:.2f} GiB")
    results.append(result)
  return {"target": t, "mesh": dict(mesh.shape), "params": count,
          "results": results, "latent": latent}


def _with(config, **arvm):
  import ml_collections
  config = ml_collections.ConfigDict(config.to_dict())
  config.arvm.update(arvm)
  return config


def _size(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def format_report(config_name: str, report: dict[str, Any]) -> str:
  t = report["target"]
  lines = [f"{config_name} on {t.name}: {t.note}",
           f"mesh {report['mesh']}; {report['params']:,} parameters"]
  if report["latent"]:
    lines.append("latent grid {}x{}x{}".format(*report["latent"]))
  hbm = "" if t.hbm_bytes is None else f" of {_size(t.hbm_bytes)}"
  lines += ["", "| program | compile s | arguments | outputs | temporaries | "
            f"total{hbm} | FLOPs | bytes accessed | predicted ms |",
            "|---|---|---|---|---|---|---|---|---|"]
  for r in report["results"]:
    lines.append(
        f"| {r.label} | {r.seconds:.1f} | {_size(r.argument_bytes)} | "
        f"{_size(r.output_bytes)} | {_size(r.temp_bytes)} | "
        f"{_size(r.total_bytes)} | {r.flops:.3g}{'*' if r.loops else ''} | "
        f"{r.bytes_accessed:.3g}{'*' if r.loops else ''} | "
        f"{'-' if r.loops else f'{1e3 * r.step_seconds(t):.3g}'} |")
  lines.append("\nPer device. Predicted = max(FLOPs / peak, bytes / "
               "bandwidth): a lower bound (no collectives, no overheads).")
  if t.hbm_bytes is None:
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = max(r.total_bytes for r in report["results"]) * len(t.devices)
    lines.append(f"Fake CPU devices share this machine's {_size(host)} of "
                 f"memory; the largest program needs {_size(need)} for all "
                 f"{len(t.devices)}" + (" (more than there is)." if need > host
                                        else "."))
  if any(r.loops for r in report["results"]):
    lines.append("* XLA counts a loop body (scanned layers, accumulated "
                 "micro-batches) once, so these are a fraction of the "
                 "program's work; no prediction.")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    report = check(config, _TOPOLOGY.value, latent=_LATENT.value,
                   compare_scan=_COMPARE_SCAN.value,
                   compare_remat=_COMPARE_REMAT.value,
                   with_sampler=_SAMPLER.value)
  except AotError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  name = next((a.split("=", 1)[1] for a in sys.argv
               if a.startswith("--config=")), "config")
  print(format_report(name, report), flush=True)


def run() -> None:
  """``python -m mesp_jax.aot``: fake CPU devices for ``--topology=cpu:N``
  are set up before JAX starts."""
  for arg in sys.argv:
    m = re.fullmatch(r"--topology=cpu:(\d+)", arg)
    if m and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count="
                                 f"{m.group(1)}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)


if __name__ == "__main__":
  run()
