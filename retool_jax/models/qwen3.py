"""Qwen3 and Qwen3-MoE causal language models in Flax NNX.

    from retool_jax.models import qwen3
    model = qwen3.load_hf("/path/to/Qwen3-1.7B")       # or qwen3.Qwen3(qwen3.preset("1.7B"), rngs=nnx.Rngs(0))
    logits_BTV = model(input_ids_BT)                    # optional positions / segment_ids / attention_mask

Decoder layers of one kind (dense or MoE) are stored stacked, `[layers, ...]`, and run either unrolled or
under `jax.lax.scan` (`config.scan_layers`); the parameter layout is the same either way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from retool_jax.models.attention import AttentionMask, causal_mask
from retool_jax.models.kv_cache import KVCache, init_cache, write_rows
from retool_jax.models.layers import DecoderLayer, LayerCache, RMSNorm, RouterStats, rope_tables
from retool_jax.models.qwen3_config import PRESETS, Qwen3Config, preset
from retool_jax.sharding import constrain

__all__ = ["Qwen3", "Qwen3Config", "KVCache", "ModelOutput", "preset", "PRESETS", "default_positions"]

_REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "attention_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


class ModelOutput(NamedTuple):
  hidden_BTD: jax.Array  # final-norm hidden states
  router_aux_loss: jax.Array | None  # Switch-style load-balancing loss (MoE only), as HF computes it


def default_positions(
  input_ids_BT: jax.Array, segment_ids_BT: jax.Array | None = None, attention_mask_BT: jax.Array | None = None
) -> jax.Array:
  """Positions restarting at 0 for each packed segment, or counting only unpadded tokens."""
  b, t = input_ids_BT.shape
  if segment_ids_BT is not None:
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - start_idx).astype(jnp.int32)
  if attention_mask_BT is not None:
    return jnp.maximum(jnp.cumsum(attention_mask_BT.astype(jnp.int32), axis=1) - 1, 0)
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _make_stack(cfg: Qwen3Config, kind: str, n: int, rngs: nnx.Rngs) -> DecoderLayer:
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(r):
    return DecoderLayer(cfg, kind, rngs=r)

  return make(rngs)


class Qwen3(nnx.Module):
  """Qwen3 / Qwen3-MoE causal LM."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
    self.config = config
    pd = config.jnp_param_dtype
    self.embed_tokens = nnx.Param(
      (0.02 * jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size))).astype(pd),
      axes=("vocab", "embed"),
    )
    kinds = config.layer_kinds
    # For each layer: (stack name, index within that stack).
    self.layer_plan = tuple((k, kinds[:i].count(k)) for i, k in enumerate(kinds))
    self.dense_layers = _make_stack(config, "dense", kinds.count("dense"), rngs) if "dense" in kinds else None
    self.moe_layers = _make_stack(config, "moe", kinds.count("moe"), rngs) if "moe" in kinds else None
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pd, axes=("embed",))
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Param(
        (0.02 * jax.random.normal(rngs.params(), (config.hidden_size, config.vocab_size))).astype(pd),
        axes=("embed", "vocab"),
      )

  # ---- public entry points --------------------------------------------------------------------

  def __call__(
    self,
    input_ids_BT: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Logits `[B, T, V]` (float32)."""
    return self.logits(self.forward(input_ids_BT, positions, segment_ids, attention_mask).hidden_BTD)

  def forward(
    self,
    input_ids_BT: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
  ) -> ModelOutput:
    """Final hidden states and the router auxiliary loss, without the `[B, T, V]` logits."""
    if positions is None:
      positions = default_positions(input_ids_BT, segment_ids, attention_mask)
    mask = None  # plain causal
    if segment_ids is not None or attention_mask is not None:
      mask = causal_mask(input_ids_BT.shape, segment_ids, attention_mask)
    valid_BT = _valid_tokens(segment_ids, attention_mask)
    h, _, stats = self._decode_layers(self._embed(input_ids_BT), positions, mask, valid_BT, cache=None)
    return ModelOutput(self.norm(h), self._aux_loss(stats))

  def logits(self, hidden_BTD: jax.Array) -> jax.Array:
    """Projects hidden states to float32 vocabulary logits."""
    w = self.output_weight_DV()
    out = jnp.einsum("...d,dv->...v", hidden_BTD, w.astype(hidden_BTD.dtype), preferred_element_type=jnp.float32)
    return constrain(out, ("batch", "length", "act_vocab")) if out.ndim == 3 else out

  def output_weight_DV(self) -> jax.Array:
    return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
    counts = {kind: sum(1 for k, _ in self.layer_plan if k == kind) for kind in ("dense", "moe")}
    counts = {k: n for k, n in counts.items() if n}
    cfg = self.config
    return init_cache(
      counts, batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim, dtype or cfg.jnp_dtype
    )

  def forward_cached(
    self,
    input_ids_BT: jax.Array,
    cache: KVCache,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    *,
    advance_B: jax.Array | None = None,
    attend_length: int | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """Prefill or decode: float32 logits `[B, T, V]` and the updated cache (see `forward_cached_hidden`)."""
    h, cache = self.forward_cached_hidden(
      input_ids_BT, cache, positions, attention_mask, advance_B=advance_B, attend_length=attend_length
    )
    return self.logits(h), cache

  def forward_cached_hidden(
    self,
    input_ids_BT: jax.Array,
    cache: KVCache,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    *,
    advance_B: jax.Array | None = None,
    attend_length: int | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """Attends to the cache plus these tokens and writes row b's tokens at columns `cache.index_B[b] + t`.

    `attention_mask[b, t] = 0` marks padding (left padding of a static batch, right padding of a packed
    prefill); padded tokens are written but never attended to. Positions default to the count of real tokens
    before each one. `advance_B` (default T) is how far each row's write position moves; a row with 0 writes
    nothing (an idle slot). `attend_length` (static) limits attention to the first columns of the cache; the
    caller keeps every real key and every written column below it, and `index_B + T <= max_length` for rows
    that write. Returns the final-norm hidden states `[B, T, D]` and the updated cache.
    """
    b, t = input_ids_BT.shape
    new_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    advance_B = jnp.full((b,), t, jnp.int32) if advance_B is None else advance_B.astype(jnp.int32)
    if positions is None:
      positions = cache.num_tokens()[:, None] + jnp.maximum(jnp.cumsum(new_valid, axis=1) - 1, 0)
    start_B = jnp.where(advance_B > 0, cache.index_B, cache.max_length)  # past the end: nothing is written
    valid_BS = write_rows(cache.valid_BS, new_valid, start_B)
    s = cache.max_length if attend_length is None else min(attend_length, cache.max_length)
    mask = AttentionMask(
      q_segment_BT=new_valid.astype(jnp.int32),
      kv_segment_BS=valid_BS[:, :s].astype(jnp.int32),
      q_index_BT=cache.index_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :],
    )
    h, cache_out, _ = self._decode_layers(
      self._embed(input_ids_BT), positions, mask, new_valid, cache=KVCache(cache.k, cache.v, valid_BS, start_B)
    )
    cache = KVCache(cache_out.k, cache_out.v, valid_BS, cache.index_B + advance_B)
    return self.norm(h), cache

  # ---- internals --------------------------------------------------------------------------------

  def _embed(self, input_ids_BT):
    x = jnp.take(self.embed_tokens[...], input_ids_BT, axis=0).astype(self.config.jnp_dtype)
    return constrain(x, ("batch", "length", "act_embed"))

  def _layer_fn(self, graphdef):
    def apply(state, x, rope, mask: AttentionMask | None, valid, layer_cache):
      layer = nnx.merge(graphdef, state)
      return layer(x, rope, mask, valid, layer_cache)

    policy = self.config.remat
    if policy == "none":
      return apply
    return jax.checkpoint(apply, policy=_REMAT_POLICIES[policy])

  def _decode_layers(self, x_BTD, positions_BT, mask: AttentionMask | None, valid_BT, cache: KVCache | None):
    cfg = self.config
    rope = rope_tables(positions_BT, cfg.head_dim, cfg.rope_theta, x_BTD.dtype)
    stacks = {"dense": self.dense_layers, "moe": self.moe_layers}
    split = {k: nnx.split(m) for k, m in stacks.items() if m is not None}
    fns = {k: self._layer_fn(g) for k, (g, _) in split.items()}
    new_k = dict(cache.k) if cache is not None else None
    new_v = dict(cache.v) if cache is not None else None
    all_stats: list[RouterStats] = []

    if cfg.scan_layers and len(split) == 1:
      ((kind, (_, state)),) = split.items()
      fn = fns[kind]

      def body(x, xs):
        layer_state, kc, vc = xs
        lc = None if cache is None else LayerCache(kc, vc, cache.index_B)
        x, lc, stats = fn(layer_state, x, rope, mask, valid_BT, lc)
        return x, (None if lc is None else lc.k_BSKH, None if lc is None else lc.v_BSKH, stats)

      xs = (state, None if cache is None else cache.k[kind], None if cache is None else cache.v[kind])
      x_BTD, (ks, vs, stats) = jax.lax.scan(body, x_BTD, xs)
      if cache is not None:
        new_k[kind], new_v[kind] = ks, vs
      if stats is not None:
        all_stats.append(RouterStats(*(s.sum(0) for s in stats)))
    else:
      for kind, i in self.layer_plan:
        state = jax.tree.map(lambda a: a[i], split[kind][1])
        lc = None if cache is None else LayerCache(new_k[kind][i], new_v[kind][i], cache.index_B)
        x_BTD, lc, stats = fns[kind](state, x_BTD, rope, mask, valid_BT, lc)
        if cache is not None:
          new_k[kind] = new_k[kind].at[i].set(lc.k_BSKH)
          new_v[kind] = new_v[kind].at[i].set(lc.v_BSKH)
        if stats is not None:
          all_stats.append(stats)
    new_cache = None if cache is None else KVCache(new_k, new_v, cache.valid_BS, cache.index_B)
    return x_BTD, new_cache, all_stats

  def _aux_loss(self, stats: list[RouterStats]) -> jax.Array | None:
    """E * sum_e f_e * P_e with f and P pooled over all MoE layers (HF's `load_balancing_loss_func`)."""
    if not stats:
      return None
    counts = sum(s.expert_counts_E for s in stats)
    probs = sum(s.prob_sums_E for s in stats)
    rows = jnp.maximum(sum(s.num_tokens for s in stats), 1.0)
    return self.config.num_experts * jnp.sum((counts / rows) * (probs / rows))


def _valid_tokens(segment_ids, attention_mask):
  if attention_mask is not None:
    return attention_mask.astype(bool)
  if segment_ids is not None:
    return segment_ids > 0
  return None


def __getattr__(name: str):
  """`qwen3.load_hf`: the Hugging Face loader, published here and kept in `qwen3_hf` (which imports this module)."""
  if name == "load_hf":
    from retool_jax.models.qwen3_hf import load_hf  # noqa: PLC0415  qwen3_hf imports this module: resolved on use

    return load_hf
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), "load_hf"])
