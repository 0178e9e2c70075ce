"""Qwen3 / Qwen3-MoE hyper-parameters: read from a Hugging Face `config.json`, or a named preset."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "attention_out")
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "splash", "cudnn")
MOE_IMPLS = ("ragged", "dense")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """Architecture plus the execution policy (dtypes, remat, scan) of a Qwen3 model."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  max_position_embeddings: int = 40960
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  # MoE (num_experts == 0 means dense Qwen3).
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = True
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  router_aux_loss_coef: float = 0.001
  # Token ids, kept for generation configs written on export.
  bos_token_id: int | None = 151643
  eos_token_id: int | None = 151645
  pad_token_id: int | None = None
  # Execution policy (not part of the HF architecture).
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention_impl: str = "xla"
  moe_impl: str = "ragged"

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_experts}]")
    for name, allowed in (("remat", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS), ("moe_impl", MOE_IMPLS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
    for name in ("param_dtype", "dtype"):
      jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def is_moe_layer(self, layer: int) -> bool:
    """The same rule as Hugging Face's `Qwen3MoeDecoderLayer`."""
    return self.is_moe and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    return tuple("moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers))

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kwargs) -> "Qwen3Config":
    return dataclasses.replace(self, **kwargs)

  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    d, h = self.hidden_size, self.head_dim
    attn = d * h * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * h + 2 * d
    total = 0
    for kind in self.layer_kinds:
      if kind == "moe":
        mlp = self.num_experts * 3 * d * self.moe_intermediate_size + d * self.num_experts
      else:
        mlp = 3 * d * self.intermediate_size
      total += attn + mlp
    total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
    return total

  def num_active_params(self) -> int:
    """Parameters touched per token (top-k experts only), excluding the embedding lookup."""
    if not self.is_moe:
      return self.num_params() - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)
    dense = self.replace(num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0)
    per_layer_dense_mlp = 3 * self.hidden_size * self.intermediate_size
    per_layer_active_moe = (
      self.num_experts_per_tok * 3 * self.hidden_size * self.moe_intermediate_size
      + self.hidden_size * self.num_experts
    )
    n_moe = sum(k == "moe" for k in self.layer_kinds)
    return dense.num_active_params() + n_moe * (per_layer_active_moe - per_layer_dense_mlp)

  # ---- Hugging Face interop -------------------------------------------------------------------

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> "Qwen3Config":
    """Builds a config from a HF `config.json` (a file, the folder holding it, or the parsed dict)."""
    if isinstance(path_or_dict, Mapping):
      hf, source = dict(path_or_dict), "<dict>"
    else:
      source = os.fspath(path_or_dict)
      if os.path.isdir(source):
        source = os.path.join(source, "config.json")
      try:
        with open(source) as f:
          hf = json.load(f)
      except FileNotFoundError:
        raise FileNotFoundError(f"no Hugging Face config at {source}") from None
      except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    model_type = hf.get("model_type")
    if model_type not in ("qwen3", "qwen3_moe"):
      raise ValueError(f"{source}: model_type={model_type!r}; expected 'qwen3' or 'qwen3_moe'")
    if hf.get("use_sliding_window"):
      raise ValueError(f"{source}: use_sliding_window=true is not supported")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
      raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))

    def field(name, default=None):
      if name in hf:
        return hf[name]
      if default is None:
        raise ValueError(f"{source}: missing field {name!r}")
      return default

    heads = field("num_attention_heads")
    kwargs = dict(
      vocab_size=field("vocab_size"),
      hidden_size=field("hidden_size"),
      intermediate_size=field("intermediate_size"),
      num_hidden_layers=field("num_hidden_layers"),
      num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or field("hidden_size") // heads,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(rope_theta),
      max_position_embeddings=int(hf.get("max_position_embeddings", 40960)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", False)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=_first(hf.get("eos_token_id")),
      pad_token_id=hf.get("pad_token_id"),
    )
    if model_type == "qwen3_moe":
      kwargs.update(
        num_experts=int(hf.get("num_experts") or field("num_local_experts")),
        num_experts_per_tok=field("num_experts_per_tok"),
        moe_intermediate_size=field("moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
      )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` contents for this architecture."""
    out: dict[str, Any] = {
      "architectures": ["Qwen3MoeForCausalLM" if self.is_moe else "Qwen3ForCausalLM"],
      "model_type": "qwen3_moe" if self.is_moe else "qwen3",
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_hidden_layers,
      "num_attention_heads": self.num_attention_heads,
      "num_key_value_heads": self.num_key_value_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": None,
      "max_position_embeddings": self.max_position_embeddings,
      "tie_word_embeddings": self.tie_word_embeddings,
      "attention_bias": self.attention_bias,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": self.num_hidden_layers,
      "bos_token_id": self.bos_token_id,
      "eos_token_id": self.eos_token_id,
      "torch_dtype": "bfloat16" if self.param_dtype == "bfloat16" else "float32",
    }
    if self.pad_token_id is not None:
      out["pad_token_id"] = self.pad_token_id
    if self.is_moe:
      out.update(
        num_experts=self.num_experts,
        num_experts_per_tok=self.num_experts_per_tok,
        moe_intermediate_size=self.moe_intermediate_size,
        norm_topk_prob=self.norm_topk_prob,
        decoder_sparse_step=self.decoder_sparse_step,
        mlp_only_layers=list(self.mlp_only_layers),
        router_aux_loss_coef=self.router_aux_loss_coef,
        output_router_logits=False,
      )
    return out


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


_QWEN3_COMMON = dict(
  vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960
)

PRESETS: dict[str, dict[str, Any]] = {
  "0.6B": dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    tie_word_embeddings=True,
  ),
  "1.7B": dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    tie_word_embeddings=True,
  ),
  "4B": dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
  ),
  "4B-2507": dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
    rope_theta=5_000_000.0,
    max_position_embeddings=262144,
  ),
  "8B": dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8
  ),
  "14B": dict(
    hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8
  ),
  "32B": dict(
    hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8
  ),
  "30B-A3B": dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
  ),
  "235B-A22B": dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=94,
    num_attention_heads=64,
    num_key_value_heads=4,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=1536,
  ),
}


def preset(name: str, **overrides) -> Qwen3Config:
  """A published Qwen3 size by name (e.g. `"1.7B"`, `"30B-A3B"`), with optional overrides."""
  key = name.removeprefix("Qwen3-").removeprefix("qwen3-")
  if key not in PRESETS:
    raise ValueError(f"unknown Qwen3 preset {name!r}; known: {', '.join(PRESETS)}")
  return Qwen3Config(**{**_QWEN3_COMMON, **PRESETS[key], **overrides})
