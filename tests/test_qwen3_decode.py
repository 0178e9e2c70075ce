"""KV-cache decoding reproduces full-sequence logits; chunked log-probs equal the naive ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retool_jax.models import qwen3
from retool_jax.models.logprobs import naive_logprobs, token_logprobs

DENSE = qwen3.Qwen3Config(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
)
MOE = DENSE.replace(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=(1,))


@pytest.mark.parametrize("cfg", [DENSE, MOE, DENSE.replace(scan_layers=True)], ids=["dense", "moe", "scan"])
def test_incremental_decoding_matches_full_forward(cfg):
  model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  b, prompt_len, new = 3, 6, 5
  ids = rng.integers(0, cfg.vocab_size, (b, prompt_len + new)).astype(np.int32)
  lengths = np.array([6, 4, 1])  # prompts left-padded to a common length
  mask = np.zeros((b, prompt_len + new), np.int32)
  for i, n in enumerate(lengths):
    mask[i, prompt_len - n :] = 1
  full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

  cache = model.init_cache(b, 16)
  step = nnx.jit(lambda m, x, c, am: m.forward_cached(x, c, attention_mask=am))
  logits, cache = step(model, jnp.asarray(ids[:, :prompt_len]), cache, jnp.asarray(mask[:, :prompt_len]))
  outs = [np.asarray(logits)]
  for t in range(prompt_len, prompt_len + new):
    logits, cache = step(model, jnp.asarray(ids[:, t : t + 1]), cache, jnp.ones((b, 1), jnp.int32))
    outs.append(np.asarray(logits))
  inc = np.concatenate(outs, axis=1)
  valid = mask.astype(bool)
  np.testing.assert_allclose(inc[valid], full[valid], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache.index_B), [prompt_len + new] * b)
  np.testing.assert_array_equal(np.asarray(cache.num_tokens()), lengths + new)


def test_chunked_logprobs_equal_naive():
  model = qwen3.Qwen3(DENSE, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, DENSE.vocab_size, (2, 11)).astype(np.int32))
  targets = jnp.roll(ids, -1, axis=1)
  for temperature in (1.0, 0.7):
    ref = naive_logprobs(model(ids), targets, temperature)
    for chunk in (3, 4, 64):  # uneven, even and larger than T
      out = token_logprobs(model, ids, targets, temperature=temperature, chunk_size=chunk, with_entropy=True)
      np.testing.assert_allclose(np.asarray(out.logprobs_BT), np.asarray(ref), atol=1e-6, rtol=0)
  logp = jax.nn.log_softmax(model(ids) / 0.7, axis=-1)
  ref_entropy = -(jnp.exp(logp) * logp).sum(-1)
  np.testing.assert_allclose(np.asarray(out.entropy_BT), np.asarray(ref_entropy), atol=1e-5, rtol=0)


def test_chunked_logprobs_gradients_equal_naive():
  model = qwen3.Qwen3(DENSE, rngs=nnx.Rngs(2))
  ids = jnp.asarray(np.random.default_rng(2).integers(0, DENSE.vocab_size, (2, 9)).astype(np.int32))
  targets = jnp.roll(ids, -1, axis=1)
  graphdef, params = nnx.split(model)
  chunked = jax.grad(
    lambda p: token_logprobs(nnx.merge(graphdef, p), ids, targets, chunk_size=4).logprobs_BT.sum()
  )
  naive = jax.grad(lambda p: naive_logprobs(nnx.merge(graphdef, p)(ids), targets).sum())
  for a, b in zip(jax.tree.leaves(chunked(params)), jax.tree.leaves(naive(params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def _avals(jaxpr):
  """Every intermediate value's abstract shape, nested jaxprs (scan, remat, jit) included."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _avals(inner)


def test_chunked_logprobs_never_hold_the_full_logits():
  """Forward and backward only ever build one `[B, chunk, V]` slab of logits, never `[B, T, V]`."""
  model = qwen3.Qwen3(DENSE, rngs=nnx.Rngs(3))
  b, t, chunk, v = 2, 12, 4, DENSE.vocab_size
  ids = jnp.zeros((b, t), jnp.int32)
  graphdef, params = nnx.split(model)

  def most_logit_rows(fn):
    """The most (batch x time) rows of vocabulary-wide values any one array holds (weights are 2-D)."""
    jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(params).jaxpr
    return max(a.size // v for a in _avals(jaxpr) if a.ndim >= 3 and a.shape[-1] == v)

  chunked = most_logit_rows(
    lambda p: token_logprobs(nnx.merge(graphdef, p), ids, ids, chunk_size=chunk).logprobs_BT.sum()
  )
  naive = most_logit_rows(lambda p: naive_logprobs(nnx.merge(graphdef, p)(ids), ids).sum())
  assert naive == b * t  # the check does see full logits where they exist
  assert chunked == b * chunk
