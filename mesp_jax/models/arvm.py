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

The same module runs one slot at a time against an explicit key/value cache
(:meth:`ARVM.decode`); :mod:`mesp_jax.sample.decode` drives it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mesp_jax.base import bits as bits_lib
from mesp_jax.base.gamma import parse_gamma
from mesp_jax.models import local_attention

EMBED_CHOICES = ("linear", "linear+table")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_EMBED_INIT = nn.initializers.normal(stddev=0.02)


# ----------------------------------------------------------------------------
# Mask.
# ----------------------------------------------------------------------------


def slot_visible(query: Any, key: Any, width: int, tokens_per_pos: int,
                 gamma: int | None, xp: Any = np) -> Any:
  """Whether the query at slot ``query`` may attend to input slot ``key``.

  Works elementwise (with broadcasting) on numpy (``xp=np``) or jax
  (``xp=jnp``) integer arrays. ``key == 0`` is the start slot; ``key >= 1``
  holds token ``key - 1``; ``key < 0`` marks an empty cache entry (never
  visible).

  Args:
    query: slot index ``i`` of the query, which predicts token ``i``.
    key: input slot index.
    width: grid width ``W``.
    tokens_per_pos: ``Tp``.
    gamma: observation range, or None for the plain causal mask.
    xp: ``numpy`` or ``jax.numpy``.

  Returns:
    Boolean array of the broadcast shape.
  """
  causal = (key >= 1) & (key <= query)
  if gamma is not None:
    qpos = query // tokens_per_pos
    kpos = (key - 1) // tokens_per_pos
    drow = xp.abs(qpos // width - kpos // width)
    dcol = xp.abs(qpos % width - kpos % width)
    causal = causal & (xp.maximum(drow, dcol) <= gamma)
  return (key == 0) | causal


def gamma_mask(height: int, width: int, tokens_per_pos: int,
               gamma: int | str | None) -> np.ndarray:
  """The ``[T, T]`` boolean attention mask, ``T = height * width * Tp``.

  ``mask[i, s]`` is True iff the query at slot ``i`` (which predicts token
  ``i`` at grid position ``p(i) = divmod(i // Tp, width)``) may attend to input
  slot ``s``: ``s == 0`` (start slot) always; ``s >= 1`` (holding token
  ``j = s - 1``) iff ``j < i`` and ``max(|row(j) - row(i)|, |col(j) - col(i)|)
  <= gamma``. With ``gamma`` None / ``"global"`` this is the causal mask
  (``s <= i``). Every row has at least slot 0 visible.
  """
  gamma = parse_gamma(gamma)
  t = height * width * tokens_per_pos
  idx = np.arange(t)
  return slot_visible(idx[:, None], idx[None, :], width, tokens_per_pos,
                      gamma, xp=np)


def window_slots(width: int, tokens_per_pos: int, gamma: int | None,
                 seq_len: int) -> int:
  """Number of token slots a cache must keep for exact decoding.

  For finite ``gamma`` the query at slot ``i`` only sees slots in
  ``(i - (gamma*W + gamma + 1) * Tp, i]``, so a ring of
  ``(gamma * W + gamma + 1) * Tp`` token slots suffices; never more than the
  ``T - 1`` token slots that exist. Global gamma needs all ``T - 1``.
  """
  full = max(seq_len - 1, 1)
  if gamma is None:
    return full
  return min((gamma * width + gamma + 1) * tokens_per_pos, full)


# ----------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------


class Attention(nn.Module):
  """Multi-head attention of a query stream over context slots.

  Keys and values are projections of the (layer-normalised) context
  embeddings only; with ``kv`` they are first written into the cache at
  ``write_index`` and the query attends to the whole cache under ``mask``.
  """

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, mask: jax.Array,
               kv: dict[str, jax.Array] | None = None,
               write_index: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Attends the queries ``x`` to the context ``ctx`` (or to the cache).

    Args:
      x: [B, S, D] normalised query-stream inputs.
      ctx: [B, S, D] normalised context embeddings of the same slots.
      mask: [S, L] boolean, True = may attend (L = S without a cache, else the
        cache length); or a :class:`local_attention.LocalWindow` (no cache,
        S = T): block-local attention under the gamma mask.
      kv: optional cache ``{'k', 'v'}`` each [B, heads, L, head_dim]; the keys
        and values of ``ctx`` are written at entry ``write_index``.
      write_index: scalar int, cache entry of the first slot of ``ctx``.

    Returns:
      ([B, S, D] output, updated cache or None).
    """
    d = x.shape[-1]
    head_dim = d // self.num_heads
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype,
                              param_dtype=jnp.float32)
    q = dense((self.num_heads, head_dim), name="query")(x)  # [B, S, h, hd]
    kv_new = dense((2, self.num_heads, head_dim), name="key_value")(ctx)
    # Keys/values head-major, [B, h, S, hd]: the cache layout, so decoding
    # reads it without a transpose.
    k = jnp.swapaxes(kv_new[:, :, 0], 1, 2)
    v = jnp.swapaxes(kv_new[:, :, 1], 1, 2)
    new_cache = None
    if kv is not None:
      start = (0, 0, write_index, 0)
      k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), start)
      new_cache = {"k": k, "v": v}  # [B, h, L, hd]
    if isinstance(mask, local_attention.LocalWindow):
      if kv is not None:
        raise ValueError("block-local attention has no cache path")
      out = local_attention.block_local_attention(
          q, k.astype(self.dtype), v.astype(self.dtype), height=mask.height,
          width=mask.width, tokens_per_pos=mask.tokens_per_pos,
          gamma=mask.gamma)  # [B, S, h, hd]
      return dense(d, axis=(-2, -1), name="out")(out), None  # [B, S, D]
    logits = jnp.einsum("bshd,bhld->bhsl", q, k.astype(self.dtype))
    logits = logits.astype(jnp.float32) / math.sqrt(head_dim)  # [B, h, S, L]
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhsl,bhld->bshd", weights, v.astype(self.dtype))
    out = dense(d, axis=(-2, -1), name="out")(out)
    return out, new_cache  # [B, S, D]


class Block(nn.Module):
  """Pre-LN block: ``x + attn(LN(x), LN(ctx)); x + mlp(LN(x))``."""

  num_heads: int
  mlp_ratio: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, mask: jax.Array,
               kv: dict[str, jax.Array] | None = None,
               write_index: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    d = x.shape[-1]
    norm = functools.partial(nn.LayerNorm, dtype=self.dtype,
                             param_dtype=jnp.float32)
    h, kv = Attention(self.num_heads, dtype=self.dtype, name="attn")(
        norm(name="ln_query")(x), norm(name="ln_context")(ctx), mask, kv,
        write_index)
    x = x + h
    h = norm(name="ln_mlp")(x)
    h = nn.Dense(int(self.mlp_ratio * d), dtype=self.dtype,
                 param_dtype=jnp.float32, name="mlp_in")(h)
    h = nn.gelu(h)
    h = nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32,
                 name="mlp_out")(h)
    return x + h, kv  # [B, S, D]


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

  def __post_init__(self):
    # Accept "global" / "none" strings when the module is built directly.
    object.__setattr__(self, "gamma", parse_gamma(self.gamma))
    if self.attention not in local_attention.ATTENTION_CHOICES:
      raise ValueError(f"attention={self.attention!r} must be one of "
                       f"{list(local_attention.ATTENTION_CHOICES)}")
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

  def setup(self):
    d = self.d_model
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
    embed = functools.partial(nn.Embed, embedding_init=_EMBED_INIT, **kw)
    self.bit_proj = nn.Dense(d, **kw)
    if self.embed == "linear+table":
      self.token_table = embed(self.vocab_size, d)
    if self.num_classes > 0:
      self.label_embed = embed(self.num_classes + 1, d)
    else:
      self.bos = self.param("bos", _EMBED_INIT, (d,), jnp.float32)
    self.start_pos = self.param("start_pos", _EMBED_INIT, (d,), jnp.float32)
    # Grid position of a context token (where the input token sits) ...
    self.row_embed = embed(self.height, d)
    self.col_embed = embed(self.width, d)
    self.group_embed = embed(self.tokens_per_pos, d)
    # ... and of the token a query predicts.
    self.query_row_embed = embed(self.height, d)
    self.query_col_embed = embed(self.width, d)
    self.query_group_embed = embed(self.tokens_per_pos, d)
    self.blocks = [
        Block(self.num_heads, self.mlp_ratio, dtype=self.dtype,
              name=f"block_{n}") for n in range(self.num_layers)
    ]
    self.final_ln = nn.LayerNorm(**kw)
    self.head = nn.Dense(self.vocab_size, **kw)

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
    geometry = (self.height, self.width, self.tokens_per_pos, self.gamma)
    if local_attention.resolve_attention(self.attention,
                                         *geometry) == "block_local":
      mask = local_attention.LocalWindow(*geometry)
    else:
      mask = jnp.asarray(gamma_mask(*geometry))  # [T, T]
    for block in self.blocks:
      x, _ = block(x, ctx, mask)
    return self._logits(x)  # [B, T, V]

  # -- one-slot incremental step ----------------------------------------------

  def decode(self, prev_tokens: jax.Array, slot: jax.Array,
             cache: dict[str, Any],
             labels: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, Any]]:
    """Runs input slot ``slot`` against the cache; returns logits of token slot.

    The cache (see :func:`init_cache`) has ``L = 1 + R`` entries: entry 0 holds
    the start slot, entry ``1 + (s - 1) % R`` holds slot ``s >= 1`` (a ring
    when ``R < T - 1``), and ``cache['slots'][e]`` records which slot entry
    ``e`` holds (-1 = empty). The mask is recomputed from those stored slots
    with :func:`slot_visible`, so it equals :func:`gamma_mask` row ``slot``
    whenever R covers the window (:func:`window_slots`).

    Args:
      prev_tokens: [B] int32 token ``slot - 1`` (ignored when ``slot == 0``).
      slot: scalar int32 input slot in [0, T).
      cache: ``{'slots': [L] int32, 'layers': tuple of {'k','v'} [B, h, L,
        hd]}``.
      labels: [B] labels of the start slot / query stream.

    Returns:
      ([B, 2**g] float32 logits for token ``slot``, updated cache).
    """
    batch = prev_tokens.shape[0]
    slot = jnp.asarray(slot, jnp.int32)
    ring = cache["slots"].shape[0] - 1
    start = self._start_vector(labels, batch)  # [B, D]
    # Index arrays keep a leading axis: nn.Embed(1, D) rejects scalars.
    tok = self._token_context(prev_tokens.astype(jnp.int32),
                              jnp.maximum(slot - 1, 0)[None])  # [B, D]
    ctx = jnp.where(slot == 0, (start + self.start_pos).astype(self.dtype),
                    tok)[:, None]  # [B, 1, D]
    x = self._query_init(start, slot[None])  # [B, 1, D]
    write = jnp.where(slot == 0, 0, 1 + (slot - 1) % ring)
    slots = cache["slots"].at[write].set(slot)  # [L]
    mask = slot_visible(slot, slots, self.width, self.tokens_per_pos,
                        self.gamma, xp=jnp)[None]  # [1, L]
    new_layers = []
    for block, kv in zip(self.blocks, cache["layers"], strict=True):
      x, kv = block(x, ctx, mask, kv, write)
      new_layers.append(kv)
    logits = self._logits(x)[:, 0]  # [B, V]
    return logits, {"slots": slots, "layers": tuple(new_layers)}


def init_cache(model: ARVM, batch: int, entries: int) -> dict[str, Any]:
  """An empty decode cache with ``entries`` token slots (+1 start entry).

  Returns:
    ``{'slots': [1 + entries] int32 (-1 = empty), 'layers': tuple over layers
    of {'k', 'v'}: [batch, heads, 1 + entries, d_model // heads]}`` in the
    model's activation dtype.
  """
  length = 1 + entries
  head_dim = model.d_model // model.num_heads
  shape = (batch, model.num_heads, length, head_dim)
  layers = tuple({"k": jnp.zeros(shape, model.dtype),
                  "v": jnp.zeros(shape, model.dtype)}
                 for _ in range(model.num_layers))
  return {"slots": jnp.full((length,), -1, jnp.int32), "layers": layers}


# ----------------------------------------------------------------------------
# Construction from a config.
# ----------------------------------------------------------------------------


def build_arvm(cfg: ml_collections.ConfigDict, grid: tuple[int, int],
               bits: int) -> ARVM:
  """Builds an :class:`ARVM` from ``config.arvm``.

  Args:
    cfg: ConfigDict with ``group, gamma, num_layers, d_model, num_heads,
      mlp_ratio, num_classes, embed, dtype``.
    grid: latent grid (H, W).
    bits: bits per latent position C.

  Raises:
    ValueError naming the offending field.
  """
  for field in ("group", "gamma", "num_layers", "d_model", "num_heads",
                "mlp_ratio", "num_classes", "embed", "dtype"):
    if field not in cfg:
      raise ValueError(f"arvm.{field} is missing from the config")
  height, width = (int(v) for v in grid)
  if height < 1 or width < 1:
    raise ValueError(f"latent grid {grid} must be positive")
  if bits < 1:
    raise ValueError(f"bits per position ({bits}) must be >= 1")
  group = cfg.group
  if not isinstance(group, int) or not 1 <= group <= 16:
    raise ValueError(f"arvm.group={group!r} must be an int in 1..16")
  if bits % group:
    raise ValueError(
        f"arvm.group={group} must divide the bits per position ({bits})")
  try:
    gamma = parse_gamma(cfg.gamma)
  except ValueError as e:
    raise ValueError(f"arvm.gamma: {e}") from None
  for field in ("num_layers", "d_model", "num_heads"):
    value = cfg[field]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"arvm.{field}={value!r} must be a positive int")
  if cfg.d_model % cfg.num_heads:
    raise ValueError(
        f"arvm.d_model={cfg.d_model} must be divisible by arvm.num_heads="
        f"{cfg.num_heads}")
  if not cfg.mlp_ratio > 0:
    raise ValueError(f"arvm.mlp_ratio={cfg.mlp_ratio!r} must be > 0")
  if not isinstance(cfg.num_classes, int) or cfg.num_classes < 0:
    raise ValueError(
        f"arvm.num_classes={cfg.num_classes!r} must be an int >= 0")
  if cfg.embed not in EMBED_CHOICES:
    raise ValueError(
        f"arvm.embed={cfg.embed!r} must be one of {list(EMBED_CHOICES)}")
  if cfg.dtype not in DTYPES:
    raise ValueError(f"arvm.dtype={cfg.dtype!r} must be one of {list(DTYPES)}")
  return ARVM(height=height, width=width, bits=int(bits), group=group,
              gamma=gamma, num_layers=cfg.num_layers, d_model=cfg.d_model,
              num_heads=cfg.num_heads, mlp_ratio=float(cfg.mlp_ratio),
              num_classes=cfg.num_classes, embed=cfg.embed,
              dtype=DTYPES[cfg.dtype])
