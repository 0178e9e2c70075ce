"""Greedy decoding with the KV cache, compiled once per (batch, prompt length, budget)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retool_jax.models.qwen3 import Qwen3


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to a common length: `(ids [B, T], mask [B, T])`."""
  t = max(len(p) for p in prompts)
  ids = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    if len(p):
      ids[i, t - len(p) :] = p
      mask[i, t - len(p) :] = 1
  return ids, mask


@functools.partial(nnx.jit, static_argnames=("max_new_tokens",))
def _greedy(model: Qwen3, ids_BT, mask_BT, eos_ids, max_new_tokens: int):
  b, t = ids_BT.shape
  cache = model.init_cache(b, t + max_new_tokens)
  logits, cache = model.forward_cached(ids_BT, cache, attention_mask=mask_BT)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos_ids)

  def cond(state):
    i, _, _, done, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tok, cache, done, out = state
    logits, cache = model.forward_cached(tok[:, None], cache)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, eos_ids[0], nxt)
    out = out.at[:, i].set(nxt)
    return i + 1, nxt, cache, done | jnp.isin(nxt, eos_ids), out

  _, _, _, done, out = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, done, out))
  return out


def greedy_generate(
  model: Qwen3,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  eos_token_ids: Sequence[int] = (),
  pad_id: int = 0,
) -> list[list[int]]:
  """Greedy continuation of each prompt, stopping at (and including) the first EOS token."""
  ids, mask = left_pad(prompts, pad_id)
  eos = jnp.asarray(list(eos_token_ids) or [-1], jnp.int32)
  out = np.asarray(_greedy(model, jnp.asarray(ids), jnp.asarray(mask), eos, max_new_tokens))
  results = []
  eos_set = set(eos_token_ids)
  for row in out.tolist():
    stop = next((i for i, tok in enumerate(row) if tok in eos_set), None)
    results.append(row if stop is None else row[: stop + 1])
  return results
