"""The neural gamma-ARVM: a decoder-only transformer over latent tokens.

Sequence convention
-------------------
A latent grid of ``H x W`` positions holds ``C`` signed bits per position.
Groups of ``g`` consecutive channels are packed (``bits.pack``, MSB first) into
``Tp = C // g`` tokens per position. Tokens are ordered raster-major,
group-minor: token index ``i = (row * W + col) * Tp + k``; ``T = H * W * Tp``.

The model input has ``T`` slots. Slot 0 is the *start slot* (the class label
embedding when ``num_classes > 0``, with the extra null label id
``num_classes`` for classifier-free guidance; a learned BOS vector otherwise).
Slot ``s >= 1`` holds token ``s - 1`` (tokens shifted right), embedded from its
bits plus learned row, column and group-index embeddings of the grid position
``p(s - 1)`` of that token; the start slot has its own position vector. The
output at slot ``i`` is the histogram logits (``2**g`` values) for token ``i``.

Attention mask (:func:`gamma_mask`): the query at slot ``i`` (predicting token
``i`` at grid position ``p(i)``) sees slot 0 always, and slot ``s >= 1``
(token ``j = s - 1``) iff ``j < i`` and the Chebyshev distance between ``p(j)``
and ``p(i)`` is at most ``gamma``. ``gamma=None`` (or ``"global"``) is the plain
causal mask.

Strict locality. In a stacked self-attention transformer the hidden state of a
visible slot has itself attended to *its* window, so the receptive field grows
to ``num_layers * gamma`` and the residual stream of slot ``i`` carries token
``i - 1`` even when that token lies outside the window (e.g. at the end of the
previous row). The gamma-ARVM must condition only on the window, so the blocks
are split into two streams:

* context stream: the slot embeddings above, never mixed across slots; every
  layer projects its own keys/values from them (``LN -> Dense``);
* query stream: slot ``i`` starts from the start vector (label / BOS, always
  visible) plus learned row, column and group embeddings of the *target*
  position ``p(i)``, and passes through pre-LN blocks of masked multi-head
  attention over the context, an MLP, a final LN and a Dense head.

So logits ``i`` are a function of the start slot and the tokens the mask lets
slot ``i`` see, and nothing else (tested by perturbation), and each slot's
keys/values depend on that slot alone, which makes the KV cache (and the ring
buffer of the last ``(gamma * W + gamma + 1) * Tp`` slots) exact.

The same module runs a few slots at a time against an explicit key/value
cache (:meth:`ARVM.decode_slots`; one slot: :meth:`ARVM.decode`);
:mod:`mesp_jax.sample.decode` (raster) and :mod:`mesp_jax.sample.wavefront`
drive it. The mask, the window and the wavefront order live in
:mod:`mesp_jax.models.arvm_geometry`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mesp_jax.base import bits as bits_lib
from mesp_jax.base import config as config_lib
from mesp_jax.base.gamma import parse_gamma
from mesp_jax.models import local_attention
from mesp_jax.models.arvm_blocks import Block, layer_norm, partitioned
from mesp_jax.models.arvm_geometry import (  # noqa: F401 (re-exported)
    gamma_mask,
    slot_visible,
    window_slots,
)

EMBED_CHOICES = ("linear", "linear+table")
# The config.arvm fields build_arvm reads.
BUILD_FIELDS = ("group", "gamma", "num_layers", "d_model", "num_heads",
                "mlp_ratio", "num_classes", "embed", "dtype")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Rematerialisation of each block in the backward pass (``arvm.remat``):
# which intermediates the forward pass keeps for it.
REMAT_POLICIES = {
    "none": None,  # keep everything (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch":  # keep only weight matmuls (no attention scores)
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_EMBED_INIT = nn.initializers.normal(stddev=0.02)


# ----------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------


class ARVM(nn.Module):
  """Decoder-only gamma-ARVM transformer (see the module docstring).

  Attributes:
    height: latent grid height H.
    width: latent grid width W (grid, not model width; that is ``d_model``).
    bits: bits per position C.
    group: bits per token g (C % g == 0); vocabulary 2**g.
    gamma: observation range (Chebyshev), None = global causal.
    num_layers: transformer blocks.
    d_model: model width.
    num_heads: attention heads (d_model % num_heads == 0).
    mlp_ratio: MLP hidden width / d_model.
    num_classes: 0 = unconditional; else labels 0..num_classes-1 and the null
      label ``num_classes``.
    embed: ``'linear'`` (Dense of the +-1 bits) or ``'linear+table'`` (plus a
      learned 2**g table).
    dtype: activation dtype (params are float32).
    attention: full forward pass attention, ``'dense'`` ([T, T] mask),
      ``'block_local'`` (per grid row, :mod:`local_attention`; dense for
      global gamma) or ``'auto'`` (block-local when cheaper); same params and
      same results up to float round-off. :meth:`decode` is unaffected.
    scan_layers: run the blocks as one ``nn.scan`` (parameters and the decode
      cache stacked on a leading ``layers`` axis): one block to compile
      instead of ``num_layers``. The parameter tree differs from the
      unscanned one (:func:`stack_layers` converts).
    remat: a key of :data:`REMAT_POLICIES`; recompute each block's
      intermediates in the backward pass instead of keeping them.
  """

  height: int
  width: int
  bits: int
  group: int
  gamma: int | None
  num_layers: int
  d_model: int
  num_heads: int
  mlp_ratio: float = 4.0
  num_classes: int = 0
  embed: str = "linear"
  dtype: Any = jnp.float32
  attention: str = "dense"
  scan_layers: bool = False
  remat: str = "none"

  def __post_init__(self):
    # Accept "global" / "none" strings when the module is built directly.
    object.__setattr__(self, "gamma", parse_gamma(self.gamma))
    if self.attention not in local_attention.ATTENTION_CHOICES:
      raise ValueError(f"attention={self.attention!r} must be one of "
                       f"{list(local_attention.ATTENTION_CHOICES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} must be one of "
                       f"{list(REMAT_POLICIES)}")
    super().__post_init__()

  # Derived sizes.
  @property
  def tokens_per_pos(self) -> int:
    return self.bits // self.group

  @property
  def seq_len(self) -> int:
    return self.height * self.width * self.tokens_per_pos

  @property
  def vocab_size(self) -> int:
    return 2**self.group

  @property
  def null_label(self) -> int:
    return self.num_classes

  @property
  def window(self) -> local_attention.LocalWindow | None:
    """The full pass's block-local window, or None for dense attention."""
    geometry = (self.height, self.width, self.tokens_per_pos, self.gamma)
    if local_attention.resolve_attention(self.attention,
                                         *geometry) == "block_local":
      return local_attention.LocalWindow(*geometry)
    return None

  def setup(self):
    d = self.d_model
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32)

    def embed(num, names=("grid", "embed")):
      return nn.Embed(num, d, embedding_init=partitioned(_EMBED_INIT, *names),
                      **kw)

    lecun = nn.initializers.lecun_normal()
    zeros = nn.initializers.zeros
    self.bit_proj = nn.Dense(d, kernel_init=partitioned(lecun, None, "embed"),
                             bias_init=partitioned(zeros, "embed"), **kw)
    if self.embed == "linear+table":
      self.token_table = embed(self.vocab_size, ("vocab", "embed"))
    if self.num_classes > 0:
      self.label_embed = embed(self.num_classes + 1, ("classes", "embed"))
    else:
      self.bos = self.param("bos", partitioned(_EMBED_INIT, "embed"), (d,),
                            jnp.float32)
    self.start_pos = self.param("start_pos", partitioned(_EMBED_INIT, "embed"),
                                (d,), jnp.float32)
    # Grid position of a context token (where the input token sits) ...
    self.row_embed = embed(self.height)
    self.col_embed = embed(self.width)
    self.group_embed = embed(self.tokens_per_pos)
    # ... and of the token a query predicts.
    self.query_row_embed = embed(self.height)
    self.query_col_embed = embed(self.width)
    self.query_group_embed = embed(self.tokens_per_pos)
    block = Block
    if self.remat != "none":
      # Without scan, prevent_cse keeps XLA from merging the recomputation
      # back into the forward pass; inside scan it is not needed.
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat],
                       prevent_cse=not self.scan_layers)
    args = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                dtype=self.dtype, window=self.window)
    if self.scan_layers:
      # (x, ctx, mask, kv, write_index): x is the carry, kv is scanned (the
      # cache's stacked layers), the rest is the same for every layer.
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
          length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(**args)
    else:
      self.blocks = [block(**args, name=f"block_{n}")
                     for n in range(self.num_layers)]
    self.final_ln = layer_norm(self.dtype)
    self.head = nn.Dense(self.vocab_size,
                         kernel_init=partitioned(lecun, "embed", "vocab"),
                         bias_init=partitioned(zeros, "vocab"), **kw)

  def _run_blocks(self, x: jax.Array, ctx: jax.Array, mask: jax.Array | None,
                  layers: Any = None, write_index: jax.Array | None = None
                  ) -> tuple[jax.Array, Any]:
    """All blocks over the query stream ``x`` [B, S, D]; with a cache,
    ``layers`` is its per-layer part (a tuple of ``{'k', 'v'}``, or one
    stacked dict when scanned) and is returned updated."""
    if self.scan_layers:
      return self.layers(x, ctx, mask, layers, write_index)
    if layers is None:
      for block in self.blocks:
        x, _ = block(x, ctx, mask)
      return x, None
    new_layers = []
    for block, kv in zip(self.blocks, layers, strict=True):
      x, kv = block(x, ctx, mask, kv, write_index)
      new_layers.append(kv)
    return x, tuple(new_layers)

  # -- embeddings -------------------------------------------------------------

  def _start_vector(self, labels: jax.Array | None, batch: int) -> jax.Array:
    """[B, D] label embedding (or BOS) of the start slot."""
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full((batch,), self.null_label, jnp.int32)
      return self.label_embed(labels.astype(jnp.int32))  # [B, D]
    if labels is not None:
      raise ValueError(
          "labels were given but the ARVM is unconditional (num_classes=0)")
    return jnp.broadcast_to(self.bos, (batch, self.d_model))

  def _token_context(self, tokens: jax.Array,
                     token_index: jax.Array) -> jax.Array:
    """Context embedding of tokens sitting at sequence indices ``token_index``.

    Args:
      tokens: [...] int32 tokens in [0, 2**g).
      token_index: [...] (broadcastable) sequence index j of each token.

    Returns:
      [..., D] bit embedding + row/col/group embeddings of p(j).
    """
    tp = self.tokens_per_pos
    signed = bits_lib.unpack(tokens[..., None], self.group)  # [..., g]
    x = self.bit_proj(signed.astype(self.dtype))
    if self.embed == "linear+table":
      x = x + self.token_table(tokens)
    pos = token_index // tp
    pos_emb = (self.row_embed(pos // self.width) +
               self.col_embed(pos % self.width) +
               self.group_embed(token_index % tp))
    return (x + pos_emb).astype(self.dtype)  # [..., D]

  def _query_init(self, start: jax.Array, token_index: jax.Array) -> jax.Array:
    """Query stream input for predicting token ``token_index``.

    ``start`` [B, D] (always visible) plus the embeddings of the target grid
    position ``p(i)``; returns [B, ..., D] broadcast over ``token_index``.
    """
    tp = self.tokens_per_pos
    pos = token_index // tp
    pos_emb = (self.query_row_embed(pos // self.width) +
               self.query_col_embed(pos % self.width) +
               self.query_group_embed(token_index % tp))  # [..., D]
    extra = (1,) * (pos_emb.ndim - 1)
    return (start.reshape(start.shape[0], *extra, -1) + pos_emb).astype(
        self.dtype)

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_ln(x)
    return self.head(x).astype(jnp.float32)

  # -- full forward pass ------------------------------------------------------

  def __call__(self, tokens: jax.Array,
               labels: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits for every token.

    Args:
      tokens: [B, T] or [B, H, W, Tp] int32 tokens (sequence order as in the
        module docstring; the last token is not read).
      labels: [B] int32 class ids (``num_classes`` = null), or None
        (unconditional model; for a conditional model None means null label).

    Returns:
      [B, T, 2**g] float32 logits; entry i is the distribution of token i.
    """
    batch = tokens.shape[0]
    t = self.seq_len
    tokens = tokens.reshape(batch, -1).astype(jnp.int32)  # [B, T]
    if tokens.shape[1] != t:
      raise ValueError(
          f"expected {t} tokens per sample (H={self.height}, W={self.width}, "
          f"Tp={self.tokens_per_pos}), got {tokens.shape[1]}")
    start = self._start_vector(labels, batch)  # [B, D]
    ctx = jnp.concatenate([
        (start + self.start_pos).astype(self.dtype)[:, None],
        self._token_context(tokens[:, :-1], jnp.arange(t - 1)[None]),
    ], axis=1)  # [B, T, D]
    x = self._query_init(start, jnp.arange(t))  # [B, T, D]
    mask = None  # block-local: each block uses the window
    if self.window is None:
      mask = jnp.asarray(gamma_mask(self.height, self.width,
                                    self.tokens_per_pos, self.gamma))  # [T, T]
    x, _ = self._run_blocks(x, ctx, mask)
    return self._logits(x)  # [B, T, V]

  # -- one-slot incremental step ----------------------------------------------

  def decode_slots(self, ctx_tokens: jax.Array, ctx_slots: jax.Array,
                   entries: jax.Array, query_slots: jax.Array,
                   cache: dict[str, Any], labels: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, Any]]:
    """Writes a few input slots into the cache, then predicts a few tokens.

    The cache (see :func:`init_cache`) has ``L`` entries; ``cache['slots'][e]``
    records which input slot entry ``e`` holds (-1 = empty). The attention
    mask is rebuilt from those stored slots with :func:`slot_visible`, so a
    query equals the full forward pass whenever every slot of its window is
    still in the cache.

    Args:
      ctx_tokens: [B, n] int32 token ``s - 1`` of each written slot ``s``
        (ignored for the start slot and for unused lanes).
      ctx_slots: [n] int32 input slots to write: 0 = the start slot, ``s >= 1``
        holds token ``s - 1``, -1 = nothing (the entry is tagged empty).
      entries: [n] int32 cache entry of each written slot.
      query_slots: [m] int32 tokens to predict (-1 = unused lane; its logits
        are meaningless).
      cache: ``{'slots': [L] int32, 'layers': tuple of {'k','v'} [B, h, L,
        hd]}`` (keys ``'kt'`` [B, h, hd, L] when transposed,
        :func:`init_cache`).
      labels: [B] labels of the start slot / query stream.

    Returns:
      ([B, m, 2**g] float32 logits, updated cache).
    """
    batch = ctx_tokens.shape[0]
    start = self._start_vector(labels, batch)  # [B, D]
    tok = self._token_context(ctx_tokens.astype(jnp.int32),
                              jnp.maximum(ctx_slots - 1, 0)[None])  # [B, n, D]
    first = (start + self.start_pos).astype(self.dtype)[:, None]  # [B, 1, D]
    ctx = jnp.where((ctx_slots == 0)[None, :, None], first, tok)  # [B, n, D]
    x = self._query_init(start, jnp.maximum(query_slots, 0))  # [B, m, D]
    slots = cache["slots"].at[entries].set(ctx_slots)  # [L]
    mask = slot_visible(query_slots[:, None], slots[None, :], self.width,
                        self.tokens_per_pos, self.gamma, xp=jnp)  # [m, L]
    x, layers = self._run_blocks(x, ctx, mask, cache["layers"], entries)
    return self._logits(x), {"slots": slots, "layers": layers}

  def decode(self, prev_tokens: jax.Array, slot: jax.Array,
             cache: dict[str, Any],
             labels: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, Any]]:
    """Runs input slot ``slot`` against the cache; returns logits of token slot.

    Raster decoding, one slot per call: the cache has ``L = 1 + R`` entries;
    entry 0 holds the start slot and entry ``1 + (s - 1) % R`` holds slot
    ``s >= 1`` (a ring when ``R < T - 1``; exact when R covers the window,
    :func:`window_slots`).

    Args:
      prev_tokens: [B] int32 token ``slot - 1`` (ignored when ``slot == 0``).
      slot: scalar int32 input slot in [0, T).
      cache: as for :meth:`decode_slots`.
      labels: [B] labels of the start slot / query stream.

    Returns:
      ([B, 2**g] float32 logits for token ``slot``, updated cache).
    """
    slot = jnp.asarray(slot, jnp.int32)[None]  # [1]
    ring = cache["slots"].shape[0] - 1
    write = jnp.where(slot == 0, 0, 1 + (slot - 1) % ring)  # [1]
    logits, cache = self.decode_slots(prev_tokens[:, None], slot, write, slot,
                                      cache, labels)
    return logits[:, 0], cache  # [B, V]


def init_cache(model: ARVM, batch: int, entries: int,
               keys_transposed: bool = False) -> dict[str, Any]:
  """An empty decode cache with ``entries`` token slots (+1 start entry).

  Args:
    model: the ARVM.
    batch: rows of the cache (two per sample when guiding).
    entries: token-slot entries (the start entry is added).
    keys_transposed: store the keys as ``'kt'`` [batch, heads, d_model //
      heads, 1 + entries] instead of ``'k'``: several queries per step then
      take their logits as one plain [m, hd] x [hd, L] product per head,
      which XLA's CPU backend runs several times faster than the product
      against [L, hd] keys (docs/benchmarks.md, 'Locality as speed'). The
      wavefront decoder uses it; the values are always [.., L, hd].

  Returns:
    ``{'slots': [1 + entries] int32 (-1 = empty), 'layers': tuple over layers
    of {'k' (or 'kt'), 'v'}: [batch, heads, 1 + entries, d_model // heads]}``
    in the model's activation dtype; with ``scan_layers`` one such dict whose
    arrays have a leading ``num_layers`` axis. Either way the batch is axis
    -4.
  """
  length = 1 + entries
  head_dim = model.d_model // model.num_heads
  shape = (batch, model.num_heads, length, head_dim)
  key_name, key_shape = "k", shape
  if keys_transposed:
    key_name, key_shape = "kt", (batch, model.num_heads, head_dim, length)
  if model.scan_layers:
    stack = (model.num_layers,)
    layers = {key_name: jnp.zeros(stack + key_shape, model.dtype),
              "v": jnp.zeros(stack + shape, model.dtype)}
  else:
    layers = tuple({key_name: jnp.zeros(key_shape, model.dtype),
                    "v": jnp.zeros(shape, model.dtype)}
                   for _ in range(model.num_layers))
  return {"slots": jnp.full((length,), -1, jnp.int32), "layers": layers}


def cache_nbytes(model: ARVM, batch: int, entries: int) -> int:
  """Bytes of :func:`init_cache` ``(model, batch, entries)``: keys, values and
  slot tags, from the shapes alone (the same for either key layout)."""
  shapes = jax.eval_shape(lambda: init_cache(model, batch, entries))
  return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
             for s in jax.tree.leaves(shapes))


def stack_layers(params: Any, num_layers: int) -> Any:
  """Unscanned ARVM parameters (``block_0`` ... ``block_{L-1}``) as the
  parameters of the same model with ``scan_layers=True`` (one ``layers``
  entry whose arrays have a leading layer axis)."""
  inner = dict(params["params"])
  blocks = [inner.pop(f"block_{n}") for n in range(num_layers)]
  inner["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**params, "params": inner}


# ----------------------------------------------------------------------------
# Construction from a config.
# ----------------------------------------------------------------------------


def build_arvm(cfg: ml_collections.ConfigDict, grid: tuple[int, int],
               bits: int) -> ARVM:
  """Builds an :class:`ARVM` from ``config.arvm`` (a run's or a saved one).

  Args:
    cfg: ConfigDict with ``group, gamma, num_layers, d_model, num_heads,
      mlp_ratio, num_classes, embed, dtype`` and optionally ``attention``
      (configs saved before it existed: dense).
    grid: latent grid (H, W).
    bits: bits per latent position C.

  Raises:
    ValueError (:class:`ConfigError`) naming the offending field.
  """
  config_lib.check_fields(cfg, "arvm", BUILD_FIELDS)
  height, width = (int(v) for v in grid)
  if height < 1 or width < 1:
    raise ValueError(f"latent grid {grid} must be positive")
  if bits < 1 or bits % cfg.group:
    raise ValueError(f"arvm.group={cfg.group} must divide the bits per "
                     f"position ({bits})")
  if cfg.d_model % cfg.num_heads:
    raise ValueError(f"arvm.d_model={cfg.d_model} must be divisible by "
                     f"arvm.num_heads={cfg.num_heads}")
  # Fields newer than some saved configs, with the defaults they ran with.
  later = {"attention": cfg.get("attention", "dense"),
           "scan_layers": cfg.get("scan_layers", False),
           "remat": cfg.get("remat", "none")}
  config_lib.check_fields(later, "arvm", tuple(later))
  return ARVM(height=height, width=width, bits=int(bits), group=cfg.group,
              gamma=parse_gamma(cfg.gamma), num_layers=cfg.num_layers,
              d_model=cfg.d_model, num_heads=cfg.num_heads,
              mlp_ratio=float(cfg.mlp_ratio), num_classes=cfg.num_classes,
              embed=cfg.embed, dtype=DTYPES[cfg.dtype], **later)
