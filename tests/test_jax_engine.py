"""The embedded engine: HF-greedy parity, trainer log-prob parity, sampling, stops, batching and weight swaps.

Continuous batching (slots) is the default; `batching="static"` is the previous batcher, kept as a baseline.
"""

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_models import save_hf_model
from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import load_tokenizer
from retool_jax.models import qwen3, qwen3_hf
from retool_jax.models.logprobs import token_logprobs
from retool_jax.rollout import Engine, GenerateRequest, JaxEngine, SamplingParams, slot_programs
from retool_jax.rollout.sampling import filter_logits, find_stop_string, sample

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
def tiny_model():
  return qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))


def trainer_logprobs(model, prompt, output, temperature):
  ids = jnp.asarray([list(prompt) + list(output)], jnp.int32)
  lp = token_logprobs(model, ids[:, :-1], ids[:, 1:], temperature=temperature).logprobs_BT
  return np.asarray(lp[0, len(prompt) - 1 :])


def test_engine_implements_protocol(tiny_model):
  assert isinstance(JaxEngine(tiny_model), Engine)


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_greedy_matches_hf_generate_with_concurrent_ragged_requests(tmp_path, batching):
  hf = save_hf_model("dense_untied_gqa2", tmp_path, seed=7)
  engine = JaxEngine(qwen3_hf.load_hf(tmp_path), eos_token_ids=(), batching=batching)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 128, n).tolist() for n in (9, 4, 17)]
  budgets = (12, 7, 20)

  async def main():  # separate calls, batched together by the engine
    calls = [
      engine.generate([GenerateRequest(tuple(p), SamplingParams(temperature=0.0, max_new_tokens=m))])
      for p, m in zip(prompts, budgets)
    ]
    return [r for rs in await asyncio.gather(*calls) for r in rs]

  results = run(main())
  assert engine.stats["rows"] == 3
  if batching == "static":
    assert engine.stats["batches"] == 1
  else:  # the three requests were queued together: one packed prefill call
    assert engine.stats["prefill_calls"] == 1
  for prompt, budget, res in zip(prompts, budgets, results):
    with torch.no_grad():
      ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=budget, do_sample=False, eos_token_id=None, pad_token_id=0
      )[0, len(prompt) :].tolist()
    assert res.output_ids == ref
    assert res.finish_reason.type == "length"
    assert len(res.output_logprobs) == len(ref)


@pytest.mark.parametrize(
  "sampling",
  [
    SamplingParams(temperature=0.0, max_new_tokens=24),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=24, seed=3),
    SamplingParams(temperature=1.3, max_new_tokens=24, seed=4),
  ],
  ids=["greedy", "t0.7_p0.9_k20", "t1.3"],
)
def test_logprobs_equal_trainer_logprobs(tiny_model, sampling):
  engine = JaxEngine(tiny_model)
  prompts = [[3, 9, 27, 81, 115], [7] * 11]
  results = run(engine.generate([GenerateRequest(tuple(p), sampling) for p in prompts]))
  temperature = sampling.temperature or 1.0
  for prompt, res in zip(prompts, results):
    assert len(res.output_ids) == sampling.max_new_tokens
    ref = trainer_logprobs(tiny_model, prompt, res.output_ids, temperature)
    np.testing.assert_allclose(res.output_logprobs, ref, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_across_batches(tiny_model):
  engine = JaxEngine(tiny_model)
  req = GenerateRequest((5, 6, 7), SamplingParams(temperature=1.0, max_new_tokens=20, seed=11))
  alone = run(engine.generate([req]))[0]
  other = GenerateRequest((1, 2, 3, 4, 5, 6, 7, 8, 9), SamplingParams(temperature=1.0, max_new_tokens=30))
  batched = run(engine.generate([other, req, other]))[1]
  assert batched.output_ids == alone.output_ids
  different = run(
    engine.generate([GenerateRequest(req.prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=20, seed=12))])
  )[0]
  assert different.output_ids != alone.output_ids


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
  out = filter_logits(logits, jnp.asarray([1.0, 0.7, 0.5]), jnp.asarray([2, -1, 3]))
  kept = np.isfinite(np.asarray(out))
  # row 0: top-2; row 1: nucleus 0.7 needs the two largest; row 2: top-3 renormalised (.2,.3,.4)/.9, 0.5 -> 2
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])


def test_sampled_tokens_follow_the_filtered_distribution():
  logits = jnp.log(jnp.asarray([0.05, 0.4, 0.3, 0.15, 0.1]))
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  keys = jax.vmap(jax.random.key_data)(keys)
  rows = lambda x: jnp.broadcast_to(jnp.asarray(x), (n,))
  draw = jax.jit(sample)
  tokens, lps = draw(jnp.broadcast_to(logits, (n, 5)), rows(1.0), rows(1.0), rows(-1), keys, rows(3))
  freq = np.bincount(np.asarray(tokens), minlength=5) / n
  np.testing.assert_allclose(freq, [0.05, 0.4, 0.3, 0.15, 0.1], atol=0.015)
  np.testing.assert_allclose(np.asarray(lps), np.log([0.05, 0.4, 0.3, 0.15, 0.1])[np.asarray(tokens)], rtol=1e-5)
  # top-k 2 keeps tokens 1 and 2 in proportion 4 : 3; the log-probs stay those of the unfiltered distribution
  tokens, lps = draw(jnp.broadcast_to(logits, (n, 5)), rows(1.0), rows(1.0), rows(2), keys, rows(3))
  freq = np.bincount(np.asarray(tokens), minlength=5) / n
  np.testing.assert_allclose(freq, [0, 4 / 7, 3 / 7, 0, 0], atol=0.015)
  # greedy rows take the argmax whatever their key
  tokens, _ = draw(jnp.broadcast_to(logits, (n, 5)), rows(0.0), rows(1.0), rows(-1), keys, rows(3))
  assert set(np.asarray(tokens).tolist()) == {1}


def test_top_k_1_sampling_is_greedy(tiny_model):
  engine = JaxEngine(tiny_model)
  prompt = (4, 8, 15, 16, 23, 42)
  greedy = run(engine.generate([GenerateRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=20))]))[0]
  topk1 = run(
    engine.generate([GenerateRequest(prompt, SamplingParams(temperature=0.9, top_k=1, max_new_tokens=20))])
  )[0]
  assert topk1.output_ids == greedy.output_ids


def test_stop_token_ends_row_and_is_kept(tiny_model):
  engine = JaxEngine(tiny_model)
  prompt = (10, 20, 30)
  free = run(engine.generate([GenerateRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=20))]))[0]
  stop = free.output_ids[6]
  res = run(
    engine.generate(
      [GenerateRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=(stop,)))]
    )
  )[0]
  first = free.output_ids.index(stop)
  assert res.output_ids == free.output_ids[: first + 1]
  # the batch ends with its last row: the free run took two decode chunks (16 steps each), this one at most one
  # (none when the prefill's token is already the stop)
  assert engine.stats["decode_chunks"] == 2 + (first > 0)
  assert res.finish_reason.type == "stop" and res.finish_reason.matched == stop
  np.testing.assert_allclose(res.output_logprobs, free.output_logprobs[: first + 1], atol=1e-6)


def test_stop_string_with_real_tokenizer():
  tok = load_tokenizer(QWEN3_TOKENIZER_DIR)
  cfg = TINY.replace(vocab_size=len(tok))
  model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(1))
  engine = JaxEngine(model, tokenizer=tok, decode_chunk=4)
  prompt = tuple(tok.encode("Compute 2+2 with code."))
  free = run(engine.generate([GenerateRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=12))]))[0]
  text = tok.decode(free.output_ids[:8])
  stop = text[-3:] if len(text.strip()) >= 3 else text
  res = run(
    engine.generate(
      [GenerateRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=12, stop=(stop, "never-matches")))]
    )
  )[0]
  assert res.finish_reason.type == "stop" and res.finish_reason.matched == stop
  assert stop in tok.decode(res.output_ids)
  assert stop not in tok.decode(res.output_ids[:-1])
  assert res.output_ids == free.output_ids[: len(res.output_ids)]


def test_find_stop_string_reports_completing_token():
  vocab = {1: "ab", 2: "</co", 3: "de>", 4: "x", 5: "</code>y"}
  decode = lambda ids: "".join(vocab[i] for i in ids)
  assert find_stop_string([1, 2, 3, 4], 0, ["</code>"], decode) == (2, "</code>")
  assert find_stop_string([1, 2, 3, 4], 3, ["</code>"], decode) is None  # matched before `checked`
  assert find_stop_string([1, 2], 0, ["</code>"], decode) is None
  assert find_stop_string([4, 5, 1], 1, ["</code>", "ab"], decode) == (1, "</code>")


def test_budget_and_bad_requests(tiny_model):
  engine = JaxEngine(tiny_model, max_length=40)
  res = run(
    engine.generate([GenerateRequest(tuple(range(1, 13)), SamplingParams(temperature=0.0, max_new_tokens=50))])
  )[0]
  assert len(res.output_ids) == 28 and res.finish_reason.type == "length"
  res = run(engine.generate([GenerateRequest(tuple(range(1, 41)), SamplingParams(max_new_tokens=5))]))[0]
  assert res.finish_reason.type == "abort" and "max_length=40" in res.finish_reason.message
  with pytest.raises(ValueError, match=r"requests\[0\].prompt_ids is empty"):
    run(engine.generate([GenerateRequest(())]))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    run(engine.generate([GenerateRequest((1, 500))]))
  with pytest.raises(ValueError, match="needs a tokenizer"):
    run(engine.generate([GenerateRequest((1, 2), SamplingParams(stop=("x",)))]))


class _Compiles:
  """Counts XLA backend compilations while active."""

  def __init__(self):
    self.count, self.on = 0, False
    jax.monitoring.register_event_duration_secs_listener(self._event)

  def _event(self, name, *_, **__):
    if self.on and name == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def during(self, fn) -> int:
    self.count, self.on = 0, True
    try:
      fn()
    finally:
      self.on = False
    return self.count


def test_bucketed_shapes_compile_once_per_bucket_not_per_request():
  model = qwen3.Qwen3(TINY.replace(num_hidden_layers=1), rngs=nnx.Rngs(2))  # programs no other test compiled
  # no kept-prefix pool: its one row-move program would compile on the first slot reuse
  engine = JaxEngine(
    model, min_prompt_bucket=16, min_attend_bucket=64, min_slot_length=64, max_batch_size=4, prefix_pool=0
  )
  compiles = _Compiles()

  def one(n: int, m: int):
    [res] = run(engine.generate([GenerateRequest(tuple(range(1, n + 1)), SamplingParams(0.0, max_new_tokens=m))]))
    assert len(res.output_ids) == m and res.finish_reason.type == "length"

  assert compiles.during(lambda: one(5, 10)) >= 2  # at least the prefill and the decode program
  assert engine.stats["compiled_programs"] == 2
  for n, m in [(3, 16), (9, 7), (16, 12), (12, 2)]:  # other lengths and budgets in the same buckets
    assert compiles.during(lambda: one(n, m)) == 0
  # a 40-token prompt pads to 64 (it prefills 28 tokens after the reused 12): one new prefill program
  assert compiles.during(lambda: one(40, 10)) == 1
  assert engine.stats["compiled_programs"] == 3


def test_prefill_projects_only_the_last_position_to_the_vocabulary(tiny_model):
  """The prompt's [R, T, V] logits are never built (with Qwen3's 152k vocabulary they dominate prefill)."""
  engine = JaxEngine(tiny_model, max_batch_size=2)
  state = slot_programs.init_state(
    engine.layer_counts, 2, 32, TINY.num_key_value_heads, TINY.head_dim, jnp.float32, 4
  )
  r, t = 2, 16
  z = lambda *shape, dtype=jnp.int32: jnp.zeros(shape, dtype)
  rows = slot_programs.PrefillRows(
    z(r), z(r), z(r), z(r, t), z(r) + t, z(r, dtype=bool), z(r, dtype=jnp.float32), z(r, dtype=jnp.float32) + 1,
    z(r) - 1, z(r, 2, dtype=jnp.uint32), z(r) + 4, z(r, 4) - 1,
  )  # fmt: skip
  lowered = slot_programs.prefill.lower(engine._graphdef, engine._params, state, rows, attend_length=32)
  hlo = lowered.compile().as_text()
  vocab = TINY.vocab_size  # no other dimension of TINY is 128
  assert f"f32[2,16,{vocab}]" not in hlo and f"f32[2,15,{vocab}]" not in hlo
  assert f"f32[2,{vocab}]" in hlo or f"f32[2,1,{vocab}]" in hlo


def test_update_weights_swaps_params_without_recompiling(tiny_model):
  engine = JaxEngine(tiny_model)
  other = qwen3.Qwen3(TINY, rngs=nnx.Rngs(5))
  req = GenerateRequest((1, 2, 3, 4), SamplingParams(temperature=0.0, max_new_tokens=20))
  before = run(engine.generate([req]))[0]
  assert before.weight_version == 0
  compiles = _Compiles()
  run(engine.update_weights(nnx.state(other), version=7))
  assert compiles.during(lambda: run(engine.generate([req]))) == 0
  after = run(engine.generate([req]))[0]
  assert after.weight_version == 7
  expected = JaxEngine(other)
  assert after.output_ids == run(expected.generate([req]))[0].output_ids
  assert after.output_ids != before.output_ids
  run(engine.update_weights(tiny_model, version="back"))  # a module works too
  assert run(engine.generate([req]))[0].output_ids == before.output_ids
  with pytest.raises(ValueError, match=r"shape \(3, 3\), the model expects \(128, 32\)"):
    run(engine.update_weights({"embed_tokens": jnp.zeros((3, 3))}, version=8))
  with pytest.raises(ValueError, match="does not match"):
    run(engine.update_weights(nnx.state(qwen3.Qwen3(TINY.replace(tie_word_embeddings=True), rngs=nnx.Rngs(0))), 9))
  assert engine.weight_version == "back"
  assert run(engine.health())


def test_close_stops_the_batcher_and_the_engine_can_start_again(tiny_model):
  engine = JaxEngine(tiny_model)
  req = GenerateRequest((1, 2, 3), SamplingParams(temperature=0.0, max_new_tokens=4))

  async def generate_then_close():
    first = await engine.generate([req])
    worker = engine._worker
    await engine.close()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    return first, worker, others

  first, worker, others = run(generate_then_close())
  assert worker.cancelled() and not others  # nothing is left pending on the loop
  assert run(engine.generate([req]))[0].output_ids == first[0].output_ids
  run(engine.close())
  run(engine.close())  # closing twice is harmless
