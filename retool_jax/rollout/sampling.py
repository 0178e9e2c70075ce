"""Token sampling on device and stop-string matching on the host.

`sample` draws one token per row with per-row temperature / top-k / top-p and per-row PRNG keys, and returns
the log-prob SGLang reports: `log_softmax(logits / temperature)` before any filtering (greedy: temperature 1).
The noise for a row depends only on its key and on how many tokens the row has generated, so a seeded request
samples the same tokens whatever batch it runs in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def filter_logits(scaled_BV: jax.Array, top_p_B: jax.Array, top_k_B: jax.Array) -> jax.Array:
  """Sets logits outside each row's top-k, then outside its top-p nucleus (of the top-k), to -inf."""
  v = scaled_BV.shape[-1]
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
  k_B = jnp.where(top_k_B < 0, v, jnp.minimum(top_k_B, v))
  in_top_k = jnp.arange(v)[None, :] < k_B[:, None]
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_BV, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = in_top_k & (mass_before < top_p_B[:, None])
  keep_sorted = keep_sorted.at[:, 0].set(True)
  threshold_B = jnp.min(jnp.where(keep_sorted, sorted_BV, jnp.inf), axis=-1)
  return jnp.where(scaled_BV >= threshold_B[:, None], scaled_BV, -jnp.inf)


def sample(
  logits_BV: jax.Array,
  temperature_B: jax.Array,
  top_p_B: jax.Array,
  top_k_B: jax.Array,
  keys_B2: jax.Array,
  step_B: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """`(tokens [B] int32, logprobs [B] float32)`; rows with temperature 0 take the argmax."""
  logits_BV = logits_BV.astype(jnp.float32)
  greedy_B = temperature_B <= 0
  scaled = logits_BV / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
  logprobs_BV = jax.nn.log_softmax(scaled, axis=-1)

  def draw(scaled_BV):
    filters = jnp.any(~greedy_B & ((top_p_B < 1.0) | (top_k_B > 0)))
    filtered = jax.lax.cond(filters, filter_logits, lambda s, *_: s, scaled_BV, top_p_B, top_k_B)
    return inverse_cdf_draw(filtered, keys_B2, step_B)

  greedy_tokens = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  drawn = jax.lax.cond(jnp.all(greedy_B), lambda s: greedy_tokens, draw, scaled)  # all greedy: no draw at all
  tokens = jnp.where(greedy_B, greedy_tokens, drawn)
  return tokens, jnp.take_along_axis(logprobs_BV, tokens[:, None], axis=-1)[:, 0]


def inverse_cdf_draw(logits_BV: jax.Array, keys_B2: jax.Array, step_B: jax.Array) -> jax.Array:
  """One token per row from `softmax(logits)` by inverse-CDF sampling: a single uniform number per row (from
  the row's key and step), where Gumbel-max would draw one per vocabulary entry."""
  u_B = jax.vmap(lambda key, step: jax.random.uniform(jax.random.fold_in(key, step), minval=1e-7))(keys_B2, step_B)
  cdf_BV = jnp.cumsum(jax.nn.softmax(logits_BV, axis=-1), axis=-1)
  index_B = jnp.sum(cdf_BV < (u_B * cdf_BV[:, -1])[:, None], axis=-1)
  return jnp.minimum(index_B, logits_BV.shape[-1] - 1).astype(jnp.int32)


def find_stop_string(
  ids: Sequence[int], checked: int, stops: Sequence[str], decode: Callable[[Sequence[int]], str]
) -> tuple[int, str] | None:
  """The first stop string completed by a token at or after index `checked` of `ids`.

  Returns `(index of the completing token, the string)`. Only a window that can hold the longest stop string
  before `checked` is decoded, so checking after every decode chunk costs O(chunk), not O(length).
  """
  if not stops or checked >= len(ids):
    return None
  lookback = max(len(s.encode()) for s in stops)
  start = max(0, checked - lookback)
  seen = len(decode(ids[start:checked]))  # matches must end in text the new tokens added
  for end in range(checked, len(ids)):
    text = decode(ids[start : end + 1])
    hits = [(i, s) for s in stops if (i := text.find(s, max(0, seen - len(s) + 1))) >= 0]
    if hits:
      return end, min(hits)[1]
  return None
