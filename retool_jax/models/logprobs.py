"""Per-token log-probabilities without materialising the whole `[B, T, V]` logits.

`log_softmax(logits / temperature)` at the target ids, the same definition SGLang reports, computed over
time chunks; each chunk is rematerialised in the backward pass, so peak memory is one chunk's logits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from retool_jax.models.qwen3 import Qwen3


class TokenLogprobs(NamedTuple):
  logprobs_BT: jax.Array  # float32
  entropy_BT: jax.Array | None  # float32, when asked for
  router_aux_loss: jax.Array | None


def chunked_logprobs(
  hidden_BTD: jax.Array,
  weight_DV: jax.Array,
  targets_BT: jax.Array,
  *,
  temperature: float = 1.0,
  chunk_size: int = 256,
  with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Log-probs (and optionally entropies) of `targets` under `softmax(hidden @ weight / temperature)`."""
  b, t, d = hidden_BTD.shape
  chunk = max(1, min(chunk_size, t))
  n = -(-t // chunk)
  pad = n * chunk - t
  h = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  y = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
  w = weight_DV.astype(hidden_BTD.dtype)

  def one_chunk(h_BCD, y_BC):
    logits = jnp.einsum("bcd,dv->bcv", h_BCD, w, preferred_element_type=jnp.float32) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y_BC[..., None], axis=-1)[..., 0]
    if not with_entropy:
      return picked - logz, jnp.zeros_like(logz)
    p = jax.nn.softmax(logits, axis=-1)
    return picked - logz, logz - jnp.sum(p * logits, axis=-1)

  if n > 1:  # one chunk's logits are all that is kept; the backward pass recomputes each chunk
    one_chunk = jax.checkpoint(one_chunk)

  def body(_, xs):
    return None, one_chunk(*xs)

  _, (lp, ent) = jax.lax.scan(body, None, (h, y))
  lp = lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  ent = ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  return lp, (ent if with_entropy else None)


def token_logprobs(
  model: Qwen3,
  input_ids_BT: jax.Array,
  targets_BT: jax.Array,
  *,
  positions: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  attention_mask: jax.Array | None = None,
  temperature: float = 1.0,
  chunk_size: int = 256,
  with_entropy: bool = False,
) -> TokenLogprobs:
  """`log p(targets[b, t] | input_ids[b, :t+1])` for a causal LM; targets are usually the inputs shifted left."""
  out = model.forward(input_ids_BT, positions, segment_ids, attention_mask)
  lp, ent = chunked_logprobs(
    out.hidden_BTD,
    model.output_weight_DV(),
    targets_BT,
    temperature=temperature,
    chunk_size=chunk_size,
    with_entropy=with_entropy,
  )
  return TokenLogprobs(lp, ent, out.router_aux_loss)


def naive_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Reference implementation on full logits."""
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
