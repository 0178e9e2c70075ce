"""Qwen3 building blocks: RMSNorm, rotary embedding, attention, SwiGLU MLP and the top-k MoE block."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from retool_jax.models.attention import AttentionMask, attend
from retool_jax.models.kv_cache import write_rows
from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.sharding import constrain


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32; the result is cast back before the weight, as in Hugging Face."""

  def __init__(self, dim: int, eps: float, *, param_dtype, axes=("norm",)):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=axes)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


class Rope(NamedTuple):
  cos: jax.Array  # [B, T, H]
  sin: jax.Array


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float, dtype) -> Rope:
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return Rope(jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype))


def apply_rope(x_BTNH: jax.Array, rope: Rope) -> jax.Array:
  half = x_BTNH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
  return x_BTNH * rope.cos[:, :, None, :] + rotated * rope.sin[:, :, None, :]


class LayerCache(NamedTuple):
  """One layer's slice of the KV cache plus where this call writes into it."""

  k_BSKH: jax.Array
  v_BSKH: jax.Array
  index_B: jax.Array  # per row: the column of its first new token (past the end: the row writes nothing)


class Attention(nnx.Module):
  """Grouped-query attention with per-head q/k RMSNorm before RoPE."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    d, n, k, h, pd = (
      cfg.hidden_size,
      cfg.num_attention_heads,
      cfg.num_key_value_heads,
      cfg.head_dim,
      cfg.jnp_param_dtype,
    )
    self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
    self.attention_impl = cfg.attention_impl
    self.q_proj = nnx.Param(_normal(rngs, (d, n, h), pd), axes=("embed", "q_heads", "head_dim"))
    self.k_proj = nnx.Param(_normal(rngs, (d, k, h), pd), axes=("embed", "kv_heads", "head_dim"))
    self.v_proj = nnx.Param(_normal(rngs, (d, k, h), pd), axes=("embed", "kv_heads", "head_dim"))
    self.o_proj = nnx.Param(_normal(rngs, (n, h, d), pd), axes=("q_heads", "head_dim", "embed"))
    if cfg.attention_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h), pd), axes=("q_heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((k, h), pd), axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((k, h), pd), axes=("kv_heads", "head_dim"))
      self.o_bias = nnx.Param(jnp.zeros((d,), pd), axes=("embed",))
    else:
      self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
    self.q_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=pd, axes=("head_dim",))
    self.k_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=pd, axes=("head_dim",))

  def _project(self, x, w, b):
    y = jnp.einsum("btd,dnh->btnh", x, w[...].astype(x.dtype))
    return y if b is None else y + b[...].astype(x.dtype)

  def __call__(
    self, x_BTD: jax.Array, rope: Rope, mask: AttentionMask | None, cache: LayerCache | None = None
  ) -> tuple[jax.Array, LayerCache | None]:
    """`mask=None` is plain causal attention over these tokens (no cache, no padding, no packing)."""
    q = self.q_norm(self._project(x_BTD, self.q_proj, self.q_bias))
    k = self.k_norm(self._project(x_BTD, self.k_proj, self.k_bias))
    v = self._project(x_BTD, self.v_proj, self.v_bias)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    q = constrain(q, ("batch", "length", "act_heads", None))
    if cache is not None:
      k = write_rows(cache.k_BSKH, k, cache.index_B)
      v = write_rows(cache.v_BSKH, v, cache.index_B)
      cache = LayerCache(k, v, cache.index_B)
      s = mask.kv_segment_BS.shape[1]  # the columns this call attends to (a live prefix of the cache)
      k, v = k[:, :s].astype(x_BTD.dtype), v[:, :s].astype(x_BTD.dtype)
    out = attend(q, k, v, mask, impl=self.attention_impl)
    out = constrain(out, ("batch", "length", "act_heads", None))
    y = jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(x_BTD.dtype))
    if self.o_bias is not None:
      y = y + self.o_bias[...].astype(y.dtype)
    return y, cache


class MLP(nnx.Module):
  """SwiGLU feed-forward."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_param_dtype
    self.gate_proj = nnx.Param(_normal(rngs, (d, f), pd), axes=("embed", "mlp"))
    self.up_proj = nnx.Param(_normal(rngs, (d, f), pd), axes=("embed", "mlp"))
    self.down_proj = nnx.Param(_normal(rngs, (f, d), pd), axes=("mlp", "embed"))

  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None):
    dt = x_BTD.dtype
    g = x_BTD @ self.gate_proj[...].astype(dt)
    u = x_BTD @ self.up_proj[...].astype(dt)
    h = constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"))
    return h @ self.down_proj[...].astype(dt), None


class RouterStats(NamedTuple):
  """What the load-balancing loss needs from one MoE layer (sums over valid tokens)."""

  expert_counts_E: jax.Array  # top-k selections per expert
  prob_sums_E: jax.Array  # router probabilities per expert
  num_tokens: jax.Array


class MoE(nnx.Module):
  """Softmax top-k routed experts (no shared experts), dropless."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    d, e, f, pd = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.jnp_param_dtype
    self.num_experts, self.top_k, self.norm_topk_prob = e, cfg.num_experts_per_tok, cfg.norm_topk_prob
    self.impl = cfg.moe_impl
    self.router = nnx.Param(_normal(rngs, (d, e), pd), axes=("embed", "router_expert"))
    self.gate_proj = nnx.Param(_normal(rngs, (e, d, f), pd), axes=("expert", "embed", "expert_mlp"))
    self.up_proj = nnx.Param(_normal(rngs, (e, d, f), pd), axes=("expert", "embed", "expert_mlp"))
    self.down_proj = nnx.Param(_normal(rngs, (e, f, d), pd), axes=("expert", "expert_mlp", "embed"))

  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None):
    b, t, d = x_BTD.shape
    dt = x_BTD.dtype
    x = x_BTD.reshape(b * t, d)
    router_logits = x @ self.router[...].astype(dt)
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_p, top_i = jax.lax.top_k(probs, self.top_k)
    if self.norm_topk_prob:
      top_p = top_p / top_p.sum(axis=-1, keepdims=True)
    top_w = top_p.astype(dt)
    wg, wu, wd = (p[...].astype(dt) for p in (self.gate_proj, self.up_proj, self.down_proj))
    if self.impl == "dense":
      y = self._dense(x, top_i, top_w, wg, wu, wd)
    elif (mesh := _expert_parallel_mesh(self.num_experts, x.shape[0])) is not None:
      y = _expert_parallel(mesh, self.top_k, x, top_i, top_w, wg, wu, wd)
    else:
      y = _ragged_experts(x, top_i, top_w, wg, wu, wd, self.top_k, self.num_experts)
    valid = jnp.ones((b * t,), jnp.float32) if valid_BT is None else valid_BT.reshape(-1).astype(jnp.float32)
    counts = jnp.zeros((self.num_experts,), jnp.float32).at[top_i.reshape(-1)].add(jnp.repeat(valid, self.top_k))
    stats = RouterStats(counts, (probs * valid[:, None]).sum(0), valid.sum())
    return y.reshape(b, t, d), stats

  def _dense(self, x, top_i, top_w, wg, wu, wd):
    combine_TE = (
      jnp.zeros((x.shape[0], self.num_experts), x.dtype).at[jnp.arange(x.shape[0])[:, None], top_i].add(top_w)
    )
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, wg)) * jnp.einsum("td,edf->tef", x, wu)
    y_TED = jnp.einsum("tef,efd->ted", h, wd)
    return jnp.einsum("ted,te->td", y_TED, combine_TE)


def _ragged_experts(x_TD, top_i, top_w, wg, wu, wd, top_k: int, num_experts: int):
  """Dropless experts: (token, expert) pairs sorted by expert, one grouped matmul per projection.

  Pairs whose expert id is >= `num_experts` (experts held elsewhere) fall past the last group, where
  `ragged_dot` yields zeros.
  """
  flat_e = top_i.reshape(-1)
  order = jnp.argsort(flat_e, stable=True)
  token = order // top_k
  xs = x_TD[token]
  group_sizes = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(xs, wg, group_sizes)) * jax.lax.ragged_dot(xs, wu, group_sizes)
  ys = jax.lax.ragged_dot(h, wd, group_sizes) * top_w.reshape(-1)[order][:, None]
  return jnp.zeros_like(x_TD).at[token].add(ys)


def _expert_parallel_mesh(num_experts: int, num_tokens: int):
  """The current mesh if it has an expert axis that can split the experts, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.shape.get("expert", 1) == 1 or num_experts % mesh.shape["expert"]:
    return None
  batch = math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp"))
  return mesh if num_tokens % batch == 0 else None


def _expert_parallel(mesh, top_k, x_TD, top_i, top_w, wg, wu, wd):
  """Expert parallelism: each expert shard runs only its own experts on the tokens routed to them.

  Tokens stay sharded over (data, fsdp) and replicated over `expert` and `tensor`; expert weights are split
  over `expert` (and their hidden width over `tensor`), so the partial outputs are summed over both axes.
  """
  batch = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
  tensor = "tensor" if "tensor" in mesh.shape and wg.shape[-1] % mesh.shape["tensor"] == 0 else None
  n_local = wg.shape[0] // mesh.shape["expert"]

  def local(x, idx, w, g, u, d):
    first = jax.lax.axis_index("expert") * n_local
    mine = (idx >= first) & (idx < first + n_local)
    local_idx = jnp.where(mine, idx - first, n_local)
    y = _ragged_experts(x, local_idx, jnp.where(mine, w, 0), g, u, d, top_k, n_local)
    return jax.lax.psum(y, ("expert",) + ((tensor,) if tensor else ()))

  tok = P(batch, None)
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(tok, tok, tok, P("expert", None, tensor), P("expert", None, tensor), P("expert", tensor, None)),
    out_specs=tok,
    check_vma=False,
  )(x_TD, top_i, top_w, wg, wu, wd)


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP (dense or MoE) with residuals."""

  def __init__(self, cfg: Qwen3Config, kind: str, *, rngs: nnx.Rngs):
    pd = cfg.jnp_param_dtype
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, axes=("embed",))
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, axes=("embed",))
    self.mlp = MoE(cfg, rngs=rngs) if kind == "moe" else MLP(cfg, rngs=rngs)

  def __call__(self, x_BTD, rope, mask: AttentionMask | None, valid_BT, cache: LayerCache | None = None):
    h, cache = self.self_attn(self.input_layernorm(x_BTD), rope, mask, cache)
    h = checkpoint_name(h, "attn_out")
    x_BTD = x_BTD + h
    y, stats = self.mlp(self.post_attention_layernorm(x_BTD), valid_BT)
    x_BTD = constrain(x_BTD + y, ("batch", "length", "act_embed"))
    return x_BTD, cache, stats
