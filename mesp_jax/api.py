"""Trained models from Python: ``load_generator(run_dir)``.

For people who use the models rather than the stages::

  import mesp_jax

  gen = mesp_jax.load_generator("runs/demo")       # BL-AE + neural ARVM
  images = gen.generate(16, labels=[7] * 16, seed=0)  # [16, H, W, C] in [-1, 1]
  tokens = gen.encode(images)                       # [16, h, w, Tp] int32
  again = gen.decode(tokens)                        # the BL-AE decode

``run_dir`` is a ``pipeline`` workdir (it holds ``arvm/`` and ``blae/``), an
``arvm`` workdir, or a ``blae_encode`` workdir with ``kind='kernel'`` (the
kernel ARVM over its training tokens). Models are restored onto every
available device; batches are split over them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mesp_jax.base import config as config_lib
from mesp_jax.base import sharding
from mesp_jax.base.gamma import parse_gamma
from mesp_jax.data.tokens import has_tokens, load_bank
from mesp_jax.models.blae import BLAE, encode_tokens
from mesp_jax.sample import kernel as kernel_lib
from mesp_jax.sample import samplers
from mesp_jax.train import arvm, blae


@dataclasses.dataclass
class Generator:
  """A BL-AE and a gamma-ARVM sampler over its tokens.

  Attributes:
    sampler: the neural or kernel sampler (:mod:`mesp_jax.sample.samplers`).
    blae_model, blae_params: the BL-AE that encodes and decodes.
    mesh: the devices everything runs on.
    batch_size: samples / images per jitted call (rounded to the mesh).
  """

  sampler: samplers.Sampler
  blae_model: BLAE
  blae_params: Any
  mesh: Mesh
  batch_size: int = 64

  def __post_init__(self):
    # Jitted once per generator, so repeated calls do not recompile.
    group = self.sampler.group
    self._decode = samplers.token_decoder(self.blae_model, self.blae_params,
                                          group, self.mesh, self.batch_size)
    self._encode = jax.jit(
        lambda p, x: encode_tokens(self.blae_model, p, x, group))

  @property
  def num_classes(self) -> int:
    return self.sampler.num_classes

  def sample_tokens(self, num: int, labels=None, seed: int = 0, **settings
                    ) -> np.ndarray:
    """[num, h, w, Tp] int32 tokens; ``settings`` override the sampler's
    (``temperature``, ``top_k``, ``top_p``, ``cfg_scale``, ``cache``,
    ``order``)."""
    sampler = (dataclasses.replace(self.sampler, **settings) if settings
               else self.sampler)
    multiple = sampler.batch_multiple
    batch = min(self.batch_size, -(-num // multiple) * multiple)
    batch = max(multiple, batch // multiple * multiple)
    tokens, _ = samplers.draw(sampler, jax.random.key(seed), num, batch,
                              labels=None if labels is None else list(labels))
    return tokens

  def generate(self, num: int, labels=None, seed: int = 0, **settings
               ) -> np.ndarray:
    """``num`` images [num, H, W, C] in [-1, 1].

    Args:
      num: how many.
      labels: class ids (conditional ARVMs; ``num_classes`` is the null
        label); default: ``i % num_classes`` for sample i.
      seed: batch b uses ``fold_in(key(seed), b)``, as the stages do.
      **settings: sampler overrides, e.g. ``cfg_scale=2.0``,
        ``temperature=0.9``.
    """
    return self.decode(self.sample_tokens(num, labels, seed, **settings))

  def decode(self, tokens: np.ndarray) -> np.ndarray:
    """Tokens [N, h, w, Tp] (g bits each) -> images [N, H, W, C] in [-1, 1]."""
    return self._decode(np.asarray(tokens))

  def encode(self, images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, C] in [-1, 1] -> tokens [N, h, w, Tp] (sign bits)."""
    return sharding.batched_map(self._encode, np.asarray(images, np.float32),
                                self.batch_size, self.mesh, self.blae_params)


def _kernel_config(tokens_dir: str, blae_dir: str, overrides: dict
                   ) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.inputs = config_lib.section("inputs", tokens_dir=tokens_dir,
                                     blae_workdir=blae_dir)
  config.tokens = config_lib.section("tokens")
  config.kernel = config_lib.section("kernel", **overrides)
  return config


def load_generator(run_dir: str, *, kind: str = "auto", mesh: Mesh | None = None,
                   batch_size: int = 64, blae_workdir: str = "",
                   **settings) -> Generator:
  """Restores a BL-AE and a gamma-ARVM from a run.

  Args:
    run_dir: a ``pipeline`` workdir, an ``arvm`` workdir, or (``kind=
      'kernel'``) a ``blae_encode`` workdir.
    kind: 'neural', 'kernel' or 'auto' (neural if an ARVM is found).
    mesh: default: every device (``data`` axis).
    batch_size: samples per jitted call.
    blae_workdir: override the BL-AE the run names.
    **settings: sampler settings. Neural: temperature, top_k, top_p,
      cfg_scale, cache, order ('raster' or 'wavefront'). Kernel: sigma_s,
      gamma, order, chunk_size, group (defaults as in the ``kernel`` config
      section), temperature.

  Raises:
    FileNotFoundError: nothing trained in ``run_dir``, with what it looked
      for.
  """
  run_dir = os.path.abspath(run_dir)
  mesh = mesh or sharding.make_mesh()
  arvm_dir = next((d for d in (run_dir, os.path.join(run_dir, "arvm"))
                   if os.path.exists(os.path.join(d, "arvm_config.json"))),
                  None)
  if kind == "auto":
    kind = "neural" if arvm_dir else "kernel"
  if kind == "neural":
    if arvm_dir is None:
      raise FileNotFoundError(
          f"no trained ARVM in {run_dir} (looked for arvm_config.json there "
          f"and in {run_dir}/arvm); pass a pipeline or arvm workdir, or "
          f"kind='kernel' with a blae_encode workdir")
    model, params, _, _, blae_dir = arvm.load_arvm(arvm_dir, mesh)
    sampler = samplers.NeuralSampler(model, params, mesh, **settings)
  elif kind == "kernel":
    tokens_dir = next((d for d in (run_dir, os.path.join(run_dir, "tokens"))
                       if has_tokens(d, "train")), None)  # .json or .npz
    if tokens_dir is None:
      raise FileNotFoundError(
          f"no tokens_train.json (or legacy tokens_train.npz) in {run_dir} or "
          f"{run_dir}/tokens: the kernel "
          f"ARVM's bank is the 'blae_encode' output of the training split")
    temperature = float(settings.pop("temperature", 1.0))
    config = _kernel_config(tokens_dir, blae_workdir, settings)
    bank = load_bank(config)
    kcfg = config.kernel
    kbank = kernel_lib.prepare_bank(bank.tokens, group=bank.group,
                                    chunk_size=int(kcfg.chunk_size), mesh=mesh)
    sampler = samplers.KernelSampler(kbank, sigma_s=float(kcfg.sigma_s),
                                     gamma=parse_gamma(kcfg.gamma),
                                     order=kcfg.order, temperature=temperature)
    blae_dir = bank.blae_workdir
  else:
    raise ValueError(f"kind={kind!r} must be 'neural', 'kernel' or 'auto'")
  blae_model, blae_params, _, _ = blae.load_blae(blae_workdir or blae_dir,
                                                 mesh)
  return Generator(sampler=sampler, blae_model=blae_model,
                   blae_params=blae_params, mesh=mesh, batch_size=batch_size)
