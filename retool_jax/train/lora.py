"""Low-rank adapters (LoRA) on Qwen3 projections, applied on the fly: `W + (alpha / rank) * A @ B`.

The base parameters stay frozen and untouched; only the adapters `A` (`[..., in, rank]`, random) and `B`
(`[..., rank, out]`, zero, so training starts from the base model) are trained. Stacked decoder layers (and MoE
experts) get one adapter pair per layer (per expert). `merge_lora` folds the adapters into plain weights for
export.

    lora = init_lora(params, LoraConfig(rank=16, alpha=32, targets=("q", "v")), jax.random.key(0))
    merged = apply_lora(params, lora, lora_config)        # inside the loss: a pure dict of full weights
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

PureDict = dict[str, Any]

# Target name -> (parameter name, input dims, output dims) of the weight, after any leading stacked dims.
PROJECTIONS: Mapping[str, tuple[str, int, int]] = {
  "q": ("q_proj", 1, 2),  # [d, heads, head_dim]
  "k": ("k_proj", 1, 2),
  "v": ("v_proj", 1, 2),
  "o": ("o_proj", 2, 1),  # [heads, head_dim, d]
  "gate": ("gate_proj", 1, 1),
  "up": ("up_proj", 1, 1),
  "down": ("down_proj", 1, 1),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapter rank, scale numerator and which projections get adapters (keys of `PROJECTIONS`)."""

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank must be positive, got {self.rank}")
    unknown = [t for t in self.targets if t not in PROJECTIONS]
    if unknown or not self.targets:
      raise ValueError(f"lora.targets={list(self.targets)}: unknown {unknown}; choose from {list(PROJECTIONS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _target_paths(params: Mapping, cfg: LoraConfig) -> list[tuple[tuple[str, ...], int, int]]:
  names = {PROJECTIONS[t][0]: PROJECTIONS[t][1:] for t in cfg.targets}
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if keys[-1] in names:
      out.append((keys, *names[keys[-1]]))
  if not out:
    raise ValueError(f"no parameter matches lora.targets={list(cfg.targets)}")
  return out


def _get(tree: Mapping, keys: Sequence[str]):
  for k in keys:
    tree = tree[k]
  return tree


def _split_shape(shape, n_in: int, n_out: int) -> tuple[tuple[int, ...], int, int]:
  lead = len(shape) - n_in - n_out
  return tuple(shape[:lead]), math.prod(shape[lead : lead + n_in]), math.prod(shape[lead + n_in :])


def init_lora(params: Mapping, cfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> PureDict:
  """Adapters for every targeted weight of `params` (a pure dict): `{"<path>": {"a": ..., "b": ...}}`."""
  lora: PureDict = {}
  for i, (keys, n_in, n_out) in enumerate(_target_paths(params, cfg)):
    lead, fan_in, fan_out = _split_shape(_get(params, keys).shape, n_in, n_out)
    a = jax.random.normal(jax.random.fold_in(key, i), lead + (fan_in, cfg.rank), jnp.float32) / math.sqrt(fan_in)
    lora["/".join(keys)] = {"a": a.astype(dtype), "b": jnp.zeros(lead + (cfg.rank, fan_out), dtype)}
  return lora


def apply_lora(params: Mapping, lora: Mapping, cfg: LoraConfig) -> PureDict:
  """A copy of `params` with `scale * A @ B` added to each adapted weight (differentiable in `lora`)."""
  out = jax.tree.map(lambda x: x, dict(params))
  for name, ab in lora.items():
    keys = name.split("/")
    parent = _get(out, keys[:-1])
    w = parent[keys[-1]]
    delta = jnp.einsum("...ir,...ro->...io", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
    parent[keys[-1]] = (w.astype(jnp.float32) + cfg.scale * delta.reshape(w.shape)).astype(w.dtype)
  return out


def merge_lora(model: nnx.Module, lora: Mapping, cfg: LoraConfig) -> nnx.Module:
  """A plain model whose weights have the adapters folded in (what an HF export should hold)."""
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x, state)  # fresh variables: the input model is left as it is
  nnx.replace_by_pure_dict(state, apply_lora(nnx.to_pure_dict(state), lora, cfg))
  return nnx.merge(graphdef, state)
