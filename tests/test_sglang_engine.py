"""SGLangEngine against the SGLang double: payloads, parsing, retries, aborts, start-up and weight sync."""

import asyncio
import json
import os
import threading
import time

import numpy as np
import pytest
import requests
from flax import nnx

from retool_jax.models import qwen3, qwen3_hf
from retool_jax.models.generate import greedy_generate
from retool_jax.rollout import Engine, GenerateRequest, SamplingParams
from retool_jax.rollout.sglang_engine import (
  SGLangEngine,
  SGLangError,
  SGLangOptions,
  generate_payload,
  parse_generate_output,
)
from retool_jax.rollout.weight_sync import prune_versions, write_hf_checkpoint
from sglang_double import FakeModel, QwenModel, SGLangDouble, detokenize

FAST = dict(backoff_s=0.01, max_backoff_s=0.02, poll_s=0.02)
TINY = qwen3.Qwen3Config(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
)


@pytest.fixture(scope="module")
def policy():
  return qwen3.Qwen3(TINY, rngs=nnx.Rngs(1))


def req(prompt, max_new=6, rid=None, **kw):
  return GenerateRequest(tuple(prompt), SamplingParams(max_new_tokens=max_new, **kw), request_id=rid)


def run(coro):
  return asyncio.run(coro)


def generate_bodies(server):
  return [body for path, body in server.log if path == "/generate"]


def test_engine_satisfies_the_protocol():
  assert isinstance(SGLangEngine("http://127.0.0.1:1"), Engine)
  with pytest.raises(ValueError, match="must start with http"):
    SGLangEngine("127.0.0.1:30000")
  with pytest.raises(ValueError, match="on_abort"):
    SGLangOptions(on_abort="ignore")


def test_payload_asks_for_ids_logprobs_and_untrimmed_text():
  body = generate_payload(
    req(
      [1, 2], 9, rid="a", temperature=0.7, top_p=0.9, top_k=5, stop=("</code>",), stop_token_ids=(151645,), seed=4
    )
  )
  assert body == {
    "input_ids": [1, 2],
    "return_logprob": True,
    "rid": "a",
    "sampling_params": {
      "max_new_tokens": 9,
      "temperature": 0.7,
      "top_p": 0.9,
      "top_k": 5,
      "no_stop_trim": True,
      "skip_special_tokens": False,
      "stop": ["</code>"],
      "stop_token_ids": [151645],
      "sampling_seed": 4,
    },
  }
  assert "sampling_seed" not in generate_payload(req([1], seed=4), seed_field=None)["sampling_params"]


def test_parse_reads_ids_from_logprob_triples_not_text():
  out = {
    "text": "ignored",
    "output_ids": [7, 8],
    "meta_info": {
      "id": "r",
      "finish_reason": {"type": "stop", "matched": "</answer>"},
      "weight_version": "3",
      "output_token_logprobs": [[-0.5, 7, None], [-1.25, 8, "x"]],
      "completion_tokens": 2,
    },
  }
  res = parse_generate_output(out)
  assert res.output_ids == [7, 8] and res.output_logprobs == [-0.5, -1.25]
  assert res.finish_reason.type == "stop" and res.finish_reason.matched == "</answer>"
  assert res.weight_version == "3" and res.meta["completion_tokens"] == 2
  with pytest.raises(SGLangError, match="disagree"):
    parse_generate_output({**out, "output_ids": [7, 9]})
  with pytest.raises(SGLangError, match="output_token_logprobs is missing"):
    parse_generate_output({"meta_info": {"finish_reason": {"type": "length", "length": 2}}})
  aborted = parse_generate_output({"meta_info": {"finish_reason": {"type": "abort", "message": "m"}}})
  assert aborted.output_ids == [] and aborted.finish_reason.message == "m"


def test_generate_returns_the_servers_tokens_and_logprobs_in_request_order():
  with SGLangDouble(eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    reqs = [
      req([5, 6, 7], 8, rid="a", temperature=0.0),
      req([9], 5, rid="b", temperature=0.0, stop_token_ids=(7,)),
    ]
    results = run(engine.generate(reqs))
    for r, body in zip(reqs, generate_bodies(s)):
      assert body["input_ids"] == list(r.prompt_ids) and body["return_logprob"] is True
      assert body["sampling_params"]["no_stop_trim"] is True
      assert body["sampling_params"]["skip_special_tokens"] is False
    for r, res in zip(reqs, results):
      direct = requests.post(s.url + "/generate", json=generate_payload(r), timeout=5).json()
      assert res.output_ids == direct["output_ids"]
      assert res.output_logprobs == [t[0] for t in direct["meta_info"]["output_token_logprobs"]]
      assert res.finish_reason.type == direct["meta_info"]["finish_reason"]["type"]
      assert res.weight_version == "default" and res.meta["id"] == r.request_id
    assert engine.stats.completed == 2 and engine.stats.requests == 2


def test_concurrency_is_bounded():
  with SGLangDouble(token_delay_s=0.005, eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(max_concurrency=3, **FAST))
    results = run(engine.generate([req([5 + i], 6) for i in range(12)]))
    assert len(results) == 12 and 2 <= s.max_running <= 3


def test_connection_errors_and_5xx_are_retried_with_backoff():
  with SGLangDouble(eos_token_id=-1) as s:
    s.fail_next, s.disconnect_next = 2, 1
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    [res] = run(engine.generate([req([5], 4)]))
    assert len(res.output_ids) >= 1 and engine.stats.transport_retries == 3
    s.fail_next = 10
    engine = SGLangEngine(s.url, options=SGLangOptions(max_retries=2, **FAST))
    [res] = run(engine.generate([req([5], 4, rid="gone")]))
    assert res.finish_reason.type == "abort" and "failed after 3 attempts" in res.meta["error"]
    assert res.meta["status"] is None and engine.stats.failed == 1 and engine.stats.rid_aborts == 0
    assert [b["rid"] for b in generate_bodies(s)[-3:]] == ["gone", "gone-retry1", "gone-retry2"]


def test_a_400_fails_that_request_only_with_the_servers_message_and_is_not_retried():
  with SGLangDouble(eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    long, fine = run(engine.generate([req([5] * 60, 10, rid="long"), req([6], 4, rid="fine")]))
    assert long.finish_reason.type == "abort" and long.meta["status"] == 400
    assert "request long" in long.meta["error"] and "maximum context length" in long.finish_reason.message
    assert fine.finish_reason.type in ("stop", "length") and len(fine.output_ids) >= 1
    assert engine.stats.failed == 1 and engine.stats.completed == 1
    assert sorted(b["rid"] for b in generate_bodies(s)) == ["fine", "long"]


def test_aborts_are_retried_then_counted():
  with SGLangDouble(eos_token_id=-1) as s:
    s.abort_next, s.abort_after_tokens = 2, 1
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    [res] = run(engine.generate([req([5], 6, rid="x", temperature=0.0)]))
    assert res.finish_reason.type != "abort" and res.meta["abort_retries"] == 2
    assert engine.stats.aborts == 2 and engine.stats.abort_retries == 2 and engine.stats.dropped == 0
    assert [b["rid"] for b in generate_bodies(s)] == ["x", "x-retry1", "x-retry2"]
    s.abort_next = 5
    engine = SGLangEngine(s.url, options=SGLangOptions(max_abort_retries=1, **FAST))
    [res] = run(engine.generate([req([5], 6)]))
    assert res.finish_reason.type == "abort" and res.meta["dropped"] is True
    assert engine.stats.aborts == 2 and engine.stats.dropped == 1


def test_drop_returns_the_partial_aborted_result_marked():
  with SGLangDouble(eos_token_id=-1) as s:
    s.abort_next, s.abort_after_tokens = 1, 3
    engine = SGLangEngine(s.url, options=SGLangOptions(on_abort="drop", **FAST))
    a, b = run(engine.generate([req([5], 8), req([6], 2)]))
    aborted, other = (a, b) if a.finish_reason.type == "abort" else (b, a)
    assert aborted.meta["dropped"] is True and len(aborted.output_ids) == 3 == len(aborted.output_logprobs)
    assert other.finish_reason.type in ("stop", "length")
    assert engine.stats.as_dict()["dropped"] == 1 and engine.stats.aborts == 1


def test_start_waits_for_health_then_checks_the_model():
  with SGLangDouble(ready=False) as s:
    threading.Timer(0.3, lambda: setattr(s, "ready", True)).start()
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    assert run(engine.health()) is False
    info = run(engine.start(timeout_s=10))
    assert info["is_generation"] is True and engine.weight_version == "default"
    assert run(engine.health()) is True
    assert sum(path == "/health_generate" for path, _ in s.log) >= 3
  with SGLangDouble(ready=False) as s:
    with pytest.raises(SGLangError, match="health_generate did not answer 200"):
      run(SGLangEngine(s.url, options=SGLangOptions(**FAST)).start(timeout_s=0.2))


def test_start_rejects_a_served_model_that_is_not_the_policy(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({**TINY.to_hf(), "hidden_size": 64}))
  with SGLangDouble(model_path=str(tmp_path)) as s:
    with pytest.raises(SGLangError, match="hidden_size: served 64, policy 32"):
      run(SGLangEngine(s.url, model_config=TINY, options=SGLangOptions(**FAST)).start(timeout_s=5))
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
    run(SGLangEngine(s.url, model_config=TINY, options=SGLangOptions(**FAST)).start(timeout_s=5))


def _params_equal(a, b) -> bool:
  fa, fb = dict(nnx.to_flat_state(nnx.state(a, nnx.Param))), dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
  return fa.keys() == fb.keys() and all(
    np.array_equal(np.asarray(fa[k].get_value()), np.asarray(fb[k].get_value())) for k in fa
  )


def test_weight_sync_during_generation_retries_in_flight_requests_on_the_new_weights(tmp_path, policy):
  model = policy
  write_hf_checkpoint(model, TINY, tmp_path / "warm-up", dtype="float32")  # later writes take milliseconds
  with SGLangDouble(token_delay_s=0.01, eos_token_id=-1) as s:
    opts = SGLangOptions(sync_dir=str(tmp_path), sync_dtype="float32", keep_versions=2, **FAST)
    engine = SGLangEngine(s.url, model_config=TINY, options=opts)

    async def scenario():
      await engine.start(timeout_s=5)
      gen = asyncio.create_task(engine.generate([req([5 + i], 60) for i in range(4)]))
      while not s.running:
        await asyncio.sleep(0.005)
      await engine.update_weights(model, version=1)
      return await gen

    results = run(scenario())
    assert all(r.weight_version == "1" and not r.meta.get("off_policy") for r in results)
    assert all(r.finish_reason.type != "abort" for r in results)
    assert engine.stats.aborts >= 1 and engine.stats.abort_retries == engine.stats.aborts
    control = [
      p
      for p, _ in s.log
      if p in ("/pause_generation", "/flush_cache", "/update_weights_from_disk", "/continue_generation")
    ]
    assert control[0] == "/pause_generation" and control[-2:] == [
      "/update_weights_from_disk",
      "/continue_generation",
    ]
    assert set(control[1:-2]) == {"/flush_cache"}
    update = next(b for p, b in s.log if p == "/update_weights_from_disk")
    assert update == {"model_path": os.path.join(str(tmp_path), "weight_v1"), "weight_version": "1"}
    assert _params_equal(qwen3_hf.load_hf(update["model_path"]), model)
    assert engine.stats.weight_syncs == 1 and s.paused is False


def test_results_from_other_weights_are_flagged_off_policy(tmp_path):
  with SGLangDouble(eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    run(engine.start(timeout_s=5))
    [fresh] = run(engine.generate([req([5], 3)]))
    assert "off_policy" not in fresh.meta
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"x")
    requests.post(
      s.url + "/update_weights_from_disk", json={"model_path": str(other), "weight_version": "9"}, timeout=5
    )
    [stale] = run(engine.generate([req([5], 3)]))
    assert stale.meta["off_policy"] is True and stale.meta["expected_weight_version"] == "default"
    assert engine.stats.off_policy == 1


def test_a_failed_update_raises_and_still_resumes_generation(tmp_path, policy):
  with SGLangDouble(eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    run(engine.start(timeout_s=5))
    with pytest.raises(SGLangError, match="update_weights_from_disk: HTTP 400: Failed to update weights"):
      run(engine.load_weights_from_disk(str(tmp_path / "nothing"), 2))
    assert s.paused is False and engine.weight_version == "default"
    assert [p for p, _ in s.log][-1] == "/continue_generation"
    [res] = run(engine.generate([req([5], 2)]))
    assert res.weight_version == "default"
    with pytest.raises(ValueError, match="sync_dir"):
      run(engine.update_weights(policy, 3))


def test_flush_is_retried_while_requests_run_and_gives_up_at_the_timeout():
  with SGLangDouble(token_delay_s=0.01, eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    outside = threading.Thread(
      target=lambda: requests.post(s.url + "/generate", json=generate_payload(req([5], 25)), timeout=10)
    )
    outside.start()
    while not s.running:
      pass

    async def flush():
      async with engine._client() as session:
        await engine._flush(session)

    run(flush())
    assert engine.stats.flush_retries >= 1 and not s.running
    outside.join()
    engine = SGLangEngine(s.url, options=SGLangOptions(flush_timeout_s=0.2, **FAST))
    outside = threading.Thread(
      target=lambda: requests.post(s.url + "/generate", json=generate_payload(req([6], 60)), timeout=10)
    )
    outside.start()
    while not s.running:
      pass
    with pytest.raises(SGLangError, match="flush_cache: HTTP 400"):
      run(flush())
    outside.join()


def test_checkpoints_are_pruned_to_the_newest(tmp_path):
  for v in (1, 2, 10):
    (tmp_path / f"weight_v{v}").mkdir()
  (tmp_path / "other").mkdir()
  removed = prune_versions(tmp_path, keep=2)
  assert removed == [str(tmp_path / "weight_v1")]
  assert sorted(os.listdir(tmp_path)) == ["other", "weight_v10", "weight_v2"]


def test_end_to_end_a_real_model_serves_the_pushed_weights(tmp_path, policy):
  """The double loads each pushed checkpoint with load_hf: greedy tokens and log-probs follow the new weights."""
  first, second = policy, qwen3.Qwen3(TINY, rngs=nnx.Rngs(5))
  write_hf_checkpoint(first, TINY, tmp_path / "base", dtype="float32")
  prompt = [3, 17, 40, 8]
  with SGLangDouble(QwenModel(str(tmp_path / "base")), model_path=str(tmp_path / "base"), eos_token_id=-1) as s:
    opts = SGLangOptions(sync_dir=str(tmp_path / "sync"), sync_dtype="float32", **FAST)
    engine = SGLangEngine(s.url, model_config=TINY, options=opts)

    async def scenario():
      await engine.start(timeout_s=5)
      [before] = await engine.generate([req(prompt, 6, temperature=0.0)])
      await engine.update_weights(second, version=1)
      [after] = await engine.generate([req(prompt, 6, temperature=0.0)])
      return before, after

    before, after = run(scenario())
  assert before.output_ids == greedy_generate(first, [prompt], max_new_tokens=6)[0]
  assert after.output_ids == greedy_generate(second, [prompt], max_new_tokens=6)[0]
  assert after.weight_version == "1" and before.output_ids != after.output_ids
  ids = prompt + after.output_ids
  logp = np.asarray(nnx.log_softmax(second(np.asarray([ids]))[0], axis=-1))
  want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(after.output_ids)]
  np.testing.assert_allclose(after.output_logprobs, want, atol=1e-5)


def test_fake_model_changes_with_the_checkpoint_bytes(tmp_path):
  m = FakeModel()
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "model.safetensors").write_bytes(b"a")
  m.load(str(tmp_path))
  a = m.logits([1, 2])
  (tmp_path / "model.safetensors").write_bytes(b"b")
  m.load(str(tmp_path))
  assert not np.array_equal(a, m.logits([1, 2]))


def test_a_session_opened_with_async_with_is_reused_and_closed():
  with SGLangDouble(eos_token_id=-1) as s:

    async def scenario():
      async with SGLangEngine(s.url, options=SGLangOptions(**FAST)) as engine:
        session = engine._session
        first = await engine.generate([req([5], 3, temperature=0.0)])
        second = await engine.generate([req([5], 3, temperature=0.0)])
        assert engine._session is session and not session.closed
      assert session.closed and engine._session is None
      return first, second

    first, second = run(scenario())
    assert first[0].output_ids == second[0].output_ids


def test_requests_are_fitted_to_the_served_context_length():
  """SGLang answers 400 unless prompt + max_new_tokens < its context length: the engine cuts the budget."""
  with SGLangDouble(eos_token_id=-1) as s:  # context length 64
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    [refused] = run(engine.generate([req([5] * 10, 100)]))  # not yet known: the server refuses
    assert refused.meta["status"] == 400 and "maximum context length of 64" in refused.meta["error"]
    run(engine.start(timeout_s=5))
    assert engine.context_length == 64
    [res] = run(engine.generate([req([5] * 10, 100, temperature=0.0)]))
    assert generate_bodies(s)[-1]["sampling_params"]["max_new_tokens"] == 53
    assert len(res.output_ids) == 53 and res.finish_reason.type == "length"
    sent = len(generate_bodies(s))
    [full] = run(engine.generate([req([5] * 63, 4)]))
    assert full.finish_reason.type == "abort" and "context length 64" in full.finish_reason.message
    assert engine.stats.too_long == 1 and len(generate_bodies(s)) == sent  # answered without a call
    explicit = SGLangEngine(s.url, options=SGLangOptions(context_length=32, **FAST))  # no start() needed
    [res] = run(explicit.generate([req([5] * 10, 100)]))
    assert len(res.output_ids) == 21 and res.finish_reason.type == "length"


def test_a_stop_on_the_last_allowed_token_is_reported_as_stop():
  """SGLang checks the budget first and answers `length`; the engine reports the stop, as the JaxEngine does."""
  with SGLangDouble(eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    [free] = run(engine.generate([req([5, 6], 12, temperature=0.0)]))
    ids = free.output_ids
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    [res] = run(engine.generate([req([5, 6], k + 1, temperature=0.0, stop_token_ids=(ids[k],))]))
    assert generate_bodies(s)[-1]["sampling_params"]["stop_token_ids"] == [ids[k]]
    assert res.output_ids == ids[: k + 1] and res.output_logprobs == free.output_logprobs[: k + 1]
    assert (res.finish_reason.type, res.finish_reason.matched) == ("stop", ids[k])
    assert res.meta["server_finish_reason"] == "length"

    text = detokenize(ids, skip_special_tokens=False)
    j = next(
      i
      for i in range(1, len(ids))
      if (two := detokenize(ids[i - 1 : i + 1], False)).strip() and two not in detokenize(ids[:i], False)
    )
    stop = detokenize(ids[j - 1 : j + 1], False)
    assert stop in text
    [res] = run(engine.generate([req([5, 6], j + 1, temperature=0.0, stop=(stop, "never"))]))
    assert res.output_ids == ids[: j + 1]
    assert (res.finish_reason.type, res.finish_reason.matched) == ("stop", stop)
    assert res.meta["server_finish_reason"] == "length"
    [cut] = run(engine.generate([req([5, 6], j, temperature=0.0, stop=(stop,))]))  # a true `length`
    assert cut.finish_reason.type == "length" and "server_finish_reason" not in cut.meta


def test_a_request_past_its_timeout_is_aborted_retried_under_fresh_rids_then_marked():
  with SGLangDouble(token_delay_s=0.05, eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(request_timeout_s=0.2, max_retries=1, **FAST))
    [res] = run(engine.generate([req([5], 40, rid="slow")]))
    assert res.finish_reason.type == "abort" and res.meta["status"] is None
    assert "failed after 2 attempts" in res.meta["error"] and "Timeout" in res.meta["error"]
    assert engine.stats.transport_retries == 1 and engine.stats.failed == 1
    assert [b["rid"] for b in generate_bodies(s)] == ["slow", "slow-retry1"]
    assert [b for p, b in s.log if p == "/abort_request"] == [{"rid": "slow"}, {"rid": "slow-retry1"}]
    deadline = time.monotonic() + 5
    while s.running and time.monotonic() < deadline:
      time.sleep(0.01)
    assert {rid: f["type"] for rid, f in s.finished.items()} == {"slow": "abort", "slow-retry1": "abort"}
