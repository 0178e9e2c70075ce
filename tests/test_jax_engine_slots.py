"""The slot engine: continuous batching, prefix reuse across turns and samples, the kept-prefix pool, abort and
deadlines, memory budget, and exactness (a seeded row does not depend on its batch mates or on prefix reuse; trainer log-probs)."""

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retool_jax.models import qwen3
from retool_jax.models.logprobs import token_logprobs
from retool_jax.rollout import GenerateRequest, JaxEngine, SamplingParams
from retool_jax.sharding import create_sharded, make_mesh

TINY = qwen3.Qwen3Config(
  vocab_size=128,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  eos_token_id=None,
)


def run(coro):
  return asyncio.run(coro)


@pytest.fixture(scope="module")
def model():
  return qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))


def engine_for(model, **kw):
  kw = {"max_batch_size": 4, "decode_chunk": 8, "min_slot_length": 128, "min_attend_bucket": 64, **kw}
  return JaxEngine(model, **kw)


def sampled(n, seed, temperature=1.0):
  return SamplingParams(temperature=temperature, max_new_tokens=n, seed=seed)


def trainer_logprobs(model, ids, start, temperature=1.0):
  """log p(ids[t] | ids[:t]) for t >= start, from the trainer's code path."""
  x = jnp.asarray([ids], jnp.int32)
  lp = token_logprobs(model, x[:, :-1], x[:, 1:], temperature=temperature).logprobs_BT
  return np.asarray(lp[0, start - 1 :])


def test_seeded_row_is_independent_of_batch_mates_and_prefix_reuse(model):
  prompt = tuple(range(3, 40))
  req = GenerateRequest(prompt, sampled(24, seed=5))
  alone = run(engine_for(model).generate([req]))[0]

  engine = engine_for(model)
  others = [GenerateRequest(tuple(range(50, 50 + n)), sampled(m, seed=n)) for n, m in ((7, 40), (60, 3), (20, 17))]
  mixed = run(engine.generate([others[0], req, others[1], others[2]]))[1]
  assert mixed.output_ids == alone.output_ids
  np.testing.assert_allclose(mixed.output_logprobs, alone.output_logprobs, atol=1e-5, rtol=0)

  # the same request again: its prompt is held by a slot (all but its last token are reused)
  hits = engine.stats["prefix_hits"]
  again = run(engine.generate([req]))[0]
  assert engine.stats["prefix_hits"] == hits + 1
  assert again.output_ids == alone.output_ids
  np.testing.assert_allclose(again.output_logprobs, alone.output_logprobs, atol=1e-5, rtol=0)
  np.testing.assert_allclose(
    alone.output_logprobs, trainer_logprobs(model, prompt + tuple(alone.output_ids), len(prompt)), atol=1e-5
  )


def test_next_turn_prefills_only_the_new_tokens_and_logprobs_equal_the_trainers(model):
  engine = engine_for(model)
  rng = np.random.default_rng(0)
  ids = list(rng.integers(1, 128, 30))
  gen_spans = []
  for turn in range(3):
    before = dict(engine.stats)
    [res] = run(engine.generate([GenerateRequest(tuple(ids), sampled(12 + 4 * turn, seed=turn, temperature=0.8))]))
    new_prefill = engine.stats["prefill_tokens"] - before["prefill_tokens"]
    if turn == 0:
      assert new_prefill == 30 and engine.stats["prefix_misses"] == 1
    else:  # the previous turn's last token (never fed) and the observation
      assert new_prefill == 1 + 9
      assert engine.stats["prefix_hits"] == turn
    gen_spans.append((len(ids), res.output_ids, res.output_logprobs))
    ids += res.output_ids
    ids += rng.integers(1, 128, 9).tolist()  # the tool's observation
  for start, out, lps in gen_spans:
    ref = trainer_logprobs(model, ids[: start + len(out)], start, temperature=0.8)
    np.testing.assert_allclose(lps, ref, atol=1e-5, rtol=0)


def test_group_samples_share_their_prompt_prefill(model):
  engine = engine_for(model)
  prompt = tuple(range(1, 41))
  group = [GenerateRequest(prompt, sampled(10, seed=s)) for s in range(4)]
  results = run(engine.generate(group))
  assert engine.stats["prefill_tokens"] == 40 + 3  # the other samples feed only the prompt's last token
  assert engine.stats["prefix_hits"] == 3
  assert len({tuple(r.output_ids) for r in results}) > 1
  alone = run(engine_for(model).generate([group[2]]))[0]
  assert results[2].output_ids == alone.output_ids
  np.testing.assert_allclose(results[2].output_logprobs, alone.output_logprobs, atol=1e-5, rtol=0)


def test_short_request_does_not_wait_for_a_long_one(model):
  engine = engine_for(model, max_batch_size=2)
  greedy = lambda n: SamplingParams(temperature=0.0, max_new_tokens=n)

  async def main():
    long = asyncio.ensure_future(engine.generate([GenerateRequest((1, 2, 3), greedy(200))]))
    await asyncio.sleep(0)
    while engine.stats["decode_chunks"] == 0:  # the long row is decoding
      await asyncio.sleep(0.01)
    short = asyncio.ensure_future(engine.generate([GenerateRequest((4, 5, 6, 7), greedy(5))]))
    done, _ = await asyncio.wait([long, short], return_when=asyncio.FIRST_COMPLETED)
    assert short in done and long not in done
    return (await short)[0], (await long)[0]

  short, long = run(main())
  assert len(short.output_ids) == 5 and len(long.output_ids) == 200
  assert (
    long.output_ids == run(engine_for(model).generate([GenerateRequest((1, 2, 3), greedy(200))]))[0].output_ids
  )


def test_abort_and_deadline_return_partial_results(model):
  engine = engine_for(model, decode_chunk=4)
  full = run(engine_for(model).generate([GenerateRequest((9, 8, 7), sampled(300, seed=1))]))[0]

  async def abort_later():
    task = asyncio.ensure_future(engine.generate([GenerateRequest((9, 8, 7), sampled(300, seed=1), "r1")]))
    while engine.stats["decode_chunks"] < 3:
      await asyncio.sleep(0.005)
    engine.abort("r1")
    return (await task)[0]

  part = run(abort_later())
  assert part.finish_reason.type == "abort" and "r1" in part.finish_reason.message
  assert 0 < len(part.output_ids) < 300
  assert part.output_ids == full.output_ids[: len(part.output_ids)]
  np.testing.assert_allclose(part.output_logprobs, full.output_logprobs[: len(part.output_ids)], atol=1e-5)

  timed = run(engine.generate([GenerateRequest((9, 8, 7, 6), sampled(100_000, seed=2), deadline_s=0.0)]))[0]
  assert timed.finish_reason.type == "abort" and "deadline" in timed.finish_reason.message
  assert len(timed.output_ids) == len(timed.output_logprobs)


def test_update_weights_drops_kept_prefixes(model):
  engine = engine_for(model)
  prompt = tuple(range(1, 30))
  run(engine.generate([GenerateRequest(prompt, sampled(8, seed=0))]))
  other = qwen3.Qwen3(TINY, rngs=nnx.Rngs(9))
  run(engine.update_weights(nnx.state(other), version=1))
  misses = engine.stats["prefix_misses"]
  res = run(engine.generate([GenerateRequest(prompt, sampled(8, seed=0))]))[0]
  assert engine.stats["prefix_misses"] == misses + 1 and res.weight_version == 1
  assert (
    res.output_ids == run(engine_for(other).generate([GenerateRequest(prompt, sampled(8, seed=0))]))[0].output_ids
  )


def test_least_recently_used_prefix_is_evicted_without_a_pool(model):
  engine = engine_for(model, max_batch_size=2, prefix_pool=0)
  prompts = [tuple(range(s, s + 20)) for s in (1, 30, 60)]
  for p in prompts:
    run(engine.generate([GenerateRequest(p, sampled(4, seed=0))]))
  assert engine.stats["evictions"] == 1  # the third prompt took the first one's slot
  run(engine.generate([GenerateRequest(prompts[2] + (5,), sampled(4, seed=0))]))
  assert engine.stats["prefix_hits"] == 1
  run(engine.generate([GenerateRequest(prompts[0], sampled(4, seed=0))]))
  assert engine.stats["prefix_hits"] == 1 and engine.stats["evictions"] == 2


def test_next_turn_after_its_slot_was_reused_restores_the_pooled_prefix(model):
  engine = engine_for(model, max_batch_size=1, prefix_pool=2)
  rng = np.random.default_rng(1)
  first, other = rng.integers(1, 128, 30).tolist(), rng.integers(1, 128, 25).tolist()
  [turn1] = run(engine.generate([GenerateRequest(tuple(first), sampled(10, seed=1))]))
  run(engine.generate([GenerateRequest(tuple(other), sampled(6, seed=2))]))  # takes the only slot
  assert engine.stats["pool_parks"] == 1 and engine.stats["evictions"] == 0
  ids = first + turn1.output_ids + rng.integers(1, 128, 7).tolist()
  second = GenerateRequest(tuple(ids), sampled(12, seed=3, temperature=0.8))
  before = dict(engine.stats)
  [pooled] = run(engine.generate([second]))
  assert engine.stats["pool_hits"] == before["pool_hits"] + 1
  assert engine.stats["prefix_hits"] == before["prefix_hits"] + 1
  new_prefill = engine.stats["prefill_tokens"] - before["prefill_tokens"]
  assert new_prefill == 1 + 7  # the unfed last token, the observation
  assert engine.stats["reused_tokens"] - before["reused_tokens"] == len(ids) - 8
  assert engine.stats["pool_parks"] == 2  # the other trajectory's prefix made room

  fresh = engine_for(model, max_batch_size=1, prefix_pool=0)
  [whole] = run(fresh.generate([second]))
  assert fresh.stats["prefill_tokens"] == len(ids)
  assert pooled.output_ids == whole.output_ids
  np.testing.assert_allclose(pooled.output_logprobs, whole.output_logprobs, atol=1e-5, rtol=0)
  ref = trainer_logprobs(model, ids + pooled.output_ids, len(ids), temperature=0.8)
  np.testing.assert_allclose(pooled.output_logprobs, ref, atol=1e-5, rtol=0)


def test_pool_evicts_its_least_recently_used_prefix(model):
  engine = engine_for(model, max_batch_size=1, prefix_pool=2)
  prompts = [tuple(range(s, s + 20)) for s in (1, 30, 60, 90)]
  for p in prompts:  # each takes the slot: the previous prompt is parked
    run(engine.generate([GenerateRequest(p, sampled(4, seed=0))]))
  assert engine.stats["pool_parks"] == 3 and engine.stats["evictions"] == 1  # the first was overwritten
  hits = engine.stats["pool_hits"]
  run(engine.generate([GenerateRequest(prompts[1] + (5,), sampled(4, seed=0))]))
  assert engine.stats["pool_hits"] == hits + 1
  misses = engine.stats["prefix_misses"]
  run(engine.generate([GenerateRequest(prompts[0] + (5,), sampled(4, seed=0))]))
  assert engine.stats["prefix_misses"] == misses + 1 and engine.stats["pool_hits"] == hits + 1


def test_update_weights_drops_the_pool(model):
  engine = engine_for(model, max_batch_size=1, prefix_pool=2)
  prompts = [tuple(range(s, s + 20)) for s in (1, 30)]
  for p in prompts:
    run(engine.generate([GenerateRequest(p, sampled(4, seed=0))]))
  assert engine.stats["pool_parks"] == 1
  other = qwen3.Qwen3(TINY, rngs=nnx.Rngs(9))
  run(engine.update_weights(nnx.state(other), version=1))
  before = dict(engine.stats)
  [res] = run(engine.generate([GenerateRequest(prompts[0] + (5,), sampled(6, seed=4))]))
  assert engine.stats["prefix_misses"] == before["prefix_misses"] + 1
  assert engine.stats["pool_hits"] == before["pool_hits"]
  assert engine.stats["prefill_tokens"] == before["prefill_tokens"] + 21
  [ref] = run(engine_for(other).generate([GenerateRequest(prompts[0] + (5,), sampled(6, seed=4))]))
  assert res.output_ids == ref.output_ids and res.weight_version == 1


def test_pool_size_comes_from_the_budget(model):
  per_row = 2 * 2 * TINY.num_key_value_heads * TINY.head_dim * 4 * 1024
  engine = JaxEngine(model, max_length=1024, max_batch_size=4, kv_cache_gib=7 * per_row / 2**30)
  assert (engine.num_slots, engine.prefix_pool) == (4, 3)
  engine = JaxEngine(model, max_length=1024, max_batch_size=4, kv_cache_gib=100 * per_row / 2**30)
  assert engine.prefix_pool == 16  # at most 4 per slot
  assert JaxEngine(model, max_length=1024, max_batch_size=4, prefix_pool=5).prefix_pool == 5
  with pytest.raises(ValueError, match=r"prefix_pool=-1 must be >= 0"):
    JaxEngine(model, prefix_pool=-1)


def test_kv_budget_sets_the_slots():
  model = qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))
  per_token = 2 * 2 * TINY.num_key_value_heads * TINY.head_dim * 4  # k and v, 2 layers, float32
  engine = JaxEngine(model, max_length=1024, max_batch_size=64, kv_cache_gib=10 * 1024 * per_token / 2**30)
  assert engine.kv_bytes_per_token() == per_token and engine.num_slots == 10
  with pytest.raises(ValueError, match=r"kv_cache_gib=1e-06 holds no slot of max_length=1024"):
    JaxEngine(model, max_length=1024, kv_cache_gib=1e-6)


def test_cache_is_sharded_over_the_mesh():
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  with jax.set_mesh(mesh):
    sharded = create_sharded(lambda: qwen3.Qwen3(TINY, rngs=nnx.Rngs(0)), mesh)
  engine = JaxEngine(sharded, max_batch_size=4, min_slot_length=64, decode_chunk=8)
  req = GenerateRequest(tuple(range(1, 20)), sampled(10, seed=3))
  res = run(engine.generate([req]))[0]
  spec = engine._scheduler.state.cache.k["dense"].sharding.spec
  assert spec[1] == ("data", "fsdp") and spec[3] == "tensor"
  assert engine._scheduler.state.pool_k["dense"].sharding.spec == spec  # pool rows sharded like the slots
  ref = run(engine_for(qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))).generate([req]))[0]
  assert res.output_ids == ref.output_ids
  np.testing.assert_allclose(res.output_logprobs, ref.output_logprobs, atol=1e-5)


def test_requests_pin_a_held_weight_version_and_unknown_versions_abort(model):
  other = qwen3.Qwen3(TINY, rngs=nnx.Rngs(9))
  engine = engine_for(model, keep_versions=2)
  prompt = tuple(range(1, 30))
  run(engine.update_weights(nnx.state(other), version=1))
  assert engine.held_versions() == [0, 1]
  old, new, missing = run(
    engine.generate(
      [
        GenerateRequest(prompt, sampled(12, seed=0), weight_version=0),
        GenerateRequest(prompt, sampled(12, seed=0)),
        GenerateRequest(prompt, sampled(12, seed=0), weight_version=7),
      ]
    )
  )
  alone = lambda m: run(engine_for(m).generate([GenerateRequest(prompt, sampled(12, seed=0))]))[0]  # noqa: E731
  assert old.output_ids == alone(model).output_ids and old.token_versions() == [0] * 12
  assert new.output_ids == alone(other).output_ids and new.weight_version == 1
  assert missing.finish_reason.type == "abort" and "weight version 7 is not held" in missing.finish_reason.message
  run(engine.update_weights(nnx.state(model), version=2))
  run(engine.generate([GenerateRequest(prompt, sampled(2, seed=0))]))
  assert engine.held_versions() == [1, 2]  # keep_versions=2: the oldest is released once nothing uses it


def test_a_following_request_continues_on_new_weights_and_records_each_tokens_version(model):
  """An update mid-request: the tokens after it come from the new weights, each labelled so.

  The KV of the tokens before the switch is kept from the old weights, so only those tokens equal the
  trainer's log-probs exactly; the later ones are the new weights' (the loss's importance ratio corrects them).
  """
  other = qwen3.Qwen3(TINY, rngs=nnx.Rngs(9))
  engine = engine_for(model, min_slot_length=256, decode_chunk=4)
  prompt = tuple(range(1, 12))
  run(engine.generate([GenerateRequest(prompt, sampled(8, seed=1))]))  # compiles the programs

  async def update_midway():
    task = asyncio.create_task(
      engine.generate([GenerateRequest(prompt, sampled(200, seed=3), follow_updates=True)])
    )
    start = engine.stats["decode_steps"]
    while engine.stats["decode_steps"] < start + 20:
      await asyncio.sleep(0.001)
    await engine.update_weights(nnx.state(other), version=1)
    return (await task)[0]

  res = run(update_midway())
  versions = res.token_versions()
  switch = versions.index(1)
  assert 20 <= switch < 200 and versions == [0] * switch + [1] * (200 - switch)
  ids = list(prompt) + res.output_ids
  lp = np.asarray(res.output_logprobs)
  np.testing.assert_allclose(lp[:switch], trainer_logprobs(model, ids, len(prompt))[:switch], atol=1e-5)
  assert np.abs(lp[switch:] - trainer_logprobs(model, ids, len(prompt))[switch:]).min() > 1e-4
