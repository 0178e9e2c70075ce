"""SGLangEngine under SGLang's faults: client timeouts, duplicate rids, slow and failing workers, kept pauses, EOS."""

import asyncio
import dataclasses
import json
import socket
import threading
import time

import pytest
import requests
from flax import nnx

from retool_jax.models import qwen3
from retool_jax.models.generate import greedy_generate
from retool_jax.rollout import GenerateRequest, JaxEngine, SamplingParams
from retool_jax.rollout.sglang_engine import SGLangEngine, SGLangOptions, WorkerError, generate_payload
from retool_jax.rollout.weight_sync import write_hf_checkpoint
from sglang_double import QwenModel, SGLangDouble

FAST = dict(backoff_s=0.01, max_backoff_s=0.02, poll_s=0.02)


def req(prompt, max_new=6, rid=None, **kw):
  return GenerateRequest(tuple(prompt), SamplingParams(max_new_tokens=max_new, **kw), request_id=rid)


def run(coro):
  return asyncio.run(coro)


def bodies(server, path="/generate"):
  return [body for p, body in server.log if p == path]


def checkpoint(folder, content: bytes = b"new weights") -> str:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
  (folder / "model.safetensors").write_bytes(content)
  return str(folder)


def wait_until(cond, timeout_s=10.0):
  deadline = time.monotonic() + timeout_s
  while not cond():
    assert time.monotonic() < deadline, "condition not reached in time"
    time.sleep(0.005)


def test_a_timed_out_request_is_aborted_and_resubmitted_under_a_fresh_rid_without_losing_the_batch():
  """The server still holds the timed-out rid: resubmitting it as is would be refused as a duplicate."""
  with SGLangDouble(eos_token_id=-1) as s:
    s.hold_next, s.hold_s = 1, 6.0
    engine = SGLangEngine(s.url, options=SGLangOptions(request_timeout_s=2.0, **FAST))
    results = run(engine.generate([req([5 + i], 4, rid=f"r{i}", temperature=0.0) for i in range(3)]))
    assert all(r.finish_reason.type == "length" and len(r.output_ids) == 4 for r in results)
    sent = [b["rid"] for b in bodies(s)]
    [held] = [rid for rid in ("r0", "r1", "r2") if f"{rid}-retry1" in sent]
    assert sorted(sent) == sorted(["r0", "r1", "r2", f"{held}-retry1"])
    assert bodies(s, "/abort_request") == [{"rid": held}]
    wait_until(lambda: held in s.finished)
    assert s.finished[held]["type"] == "abort"  # the old copy stopped instead of running on
    [resent] = [r for r in results if r.meta["id"] == f"{held}-retry1"]
    assert resent.meta["abort_retries"] == 0 and "error" not in resent.meta
    stats = engine.stats
    assert (stats.transport_retries, stats.rid_aborts, stats.duplicate_rids, stats.failed) == (1, 1, 0, 0)
    assert stats.completed == 3


def test_a_dropped_connection_is_resubmitted_under_a_fresh_rid():
  with SGLangDouble(eos_token_id=-1) as s:
    s.disconnect_next = 1
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    [res] = run(engine.generate([req([5], 3, rid="d")]))
    assert len(res.output_ids) == 3 and [b["rid"] for b in bodies(s)] == ["d", "d-retry1"]
    assert bodies(s, "/abort_request") == [{"rid": "d"}] and engine.stats.rid_aborts == 1


def test_a_duplicate_rid_400_is_resubmitted_under_a_fresh_rid():
  """Another client holds the same rid: SGLang answers 400 "Duplicate request ID detected"."""
  with SGLangDouble(eos_token_id=-1) as s:
    s.hold_next, s.hold_s = 1, 3.0
    other = threading.Thread(
      target=lambda: requests.post(s.url + "/generate", json=generate_payload(req([9], 2, rid="dup")), timeout=10)
    )
    other.start()
    wait_until(lambda: "dup" in s.running)
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    [res] = run(engine.generate([req([5], 3, rid="dup")]))
    other.join()
    assert len(res.output_ids) == 3 and res.meta["id"] == "dup-retry1"
    assert engine.stats.duplicate_rids == 1 and engine.stats.failed == 0
    assert s.finished["dup"]["type"] == "length"  # the other client's request was left alone


def test_unnamed_requests_get_rids_of_their_own():
  with SGLangDouble(eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    results = run(engine.generate([req([5], 2), req([5], 2)]))
    rids = [b["rid"] for b in bodies(s)]
    assert len(set(rids)) == 2 and sorted(r.meta["id"] for r in results) == sorted(rids)


def _phases(server, path):
  return [t for t, p, _ in server.events if p == path]


def test_a_worker_failing_fast_does_not_let_continue_overtake_a_slow_workers_update(tmp_path):
  ckpt = checkpoint(tmp_path / "weight_v1")
  with SGLangDouble(eos_token_id=-1) as fast, SGLangDouble(eos_token_id=-1) as slow:
    fast.fail_update = "Failed to update weights: disk quota exceeded."
    slow.update_delay_s = 0.5
    engine = SGLangEngine(fast.url, worker_urls=[fast.url, slow.url], options=SGLangOptions(**FAST))
    run(engine.start(timeout_s=5))
    with pytest.raises(WorkerError, match="update_weights_from_disk failed on 1 of 2 workers.*disk quota") as e:
      run(engine.load_weights_from_disk(ckpt, 1))
    assert list(e.value.failed) == [fast.url] and e.value.succeeded == [slow.url]
    for worker in (fast, slow):
      paths = [p for _, p, phase in worker.events if phase == "start"]
      assert paths == ["/pause_generation", "/update_weights_from_disk", "/continue_generation"]
      update_start, update_end = _phases(worker, "/update_weights_from_disk")
      continue_start, _ = _phases(worker, "/continue_generation")
      assert _phases(worker, "/pause_generation")[1] <= update_start and update_end <= continue_start
    # continue reached either worker only after every update had returned
    assert (
      min(_phases(w, "/continue_generation")[0] for w in (fast, slow))
      >= _phases(slow, "/update_weights_from_disk")[1]
    )
    assert not fast.paused and not slow.paused
    assert engine.weight_version == "default" and slow.weight_version == "1"  # not every worker updated
    [res] = run(engine.generate([req([5], 2)]))
    assert res.weight_version == "default" and "off_policy" not in res.meta


def test_a_worker_that_cannot_be_reached_fails_the_pause_and_the_others_are_resumed(tmp_path):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
  with SGLangDouble(eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, worker_urls=[s.url, dead], options=SGLangOptions(max_retries=1, **FAST))
    with pytest.raises(WorkerError, match="pause_generation failed on 1 of 2 workers") as e:
      run(engine.load_weights_from_disk(checkpoint(tmp_path / "weight_v1"), 1))
    assert list(e.value.failed) == [dead] and e.value.succeeded == [s.url]
    assert "; then POST /continue_generation failed on 1 of 2 workers" in str(e.value)  # reported, not hiding it
    assert [p for _, p, phase in s.events if phase == "start"] == ["/pause_generation", "/continue_generation"]
    assert not s.paused and engine.weight_version is None and engine.stats.weight_syncs == 0


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_kept_pauses_sync_without_flushing_the_requests_they_keep(tmp_path, mode):
  ckpt = checkpoint(tmp_path / "weight_v1")
  with SGLangDouble(token_delay_s=0.02, eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(pause_mode=mode, flush_timeout_s=20, **FAST))

    async def scenario():
      await engine.start(timeout_s=5)
      kept = asyncio.create_task(engine.generate([req([5 + i], 50, rid=f"k{i}") for i in range(3)]))
      while len(s.running) < 3:
        await asyncio.sleep(0.005)
      sync = asyncio.create_task(engine.load_weights_from_disk(ckpt, 1))
      while not s.paused:
        await asyncio.sleep(0.001)
      late = asyncio.create_task(engine.generate([req([9], 3, rid="late")]))
      await sync
      return await kept, await late

    kept, [late] = run(scenario())
    assert s.ready  # the server never had to flush under kept requests
    assert all(r.finish_reason.type == "length" and len(r.output_ids) == 50 for r in kept)
    assert all(r.weight_version == "1" and r.meta["off_policy"] is True for r in kept)  # tokens of two versions
    assert engine.stats.aborts == 0 and engine.stats.weight_syncs == 1 and engine.weight_version == "1"
    update = bodies(s, "/update_weights_from_disk")
    assert update == [{"model_path": ckpt, "weight_version": "1", "flush_cache": False, "keep_pause": True}]
    order = [p for p, b in s.log if p != "/generate" or b["rid"] == "late"]
    i_pause, i_update = order.index("/pause_generation"), order.index("/update_weights_from_disk")
    i_continue, i_late = order.index("/continue_generation"), order.index("/generate")
    assert i_pause < i_update < i_continue < i_late and "/flush_cache" not in order[:i_continue]
    assert order[i_late - 1] == "/flush_cache"  # new requests went out only after the cache was flushed
    assert late.weight_version == "1" and "off_policy" not in late.meta
    assert all(s.finished[f"k{i}"]["type"] == "length" for i in range(3))


def test_an_eos_on_the_last_allowed_token_is_stop(tmp_path):
  """SGLang checks the budget before EOS and answers `length`; JaxEngine says `stop`, and so does this client."""
  with SGLangDouble(eos_token_id=-1) as s:
    engine = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    [free] = run(engine.generate([req([5, 6], 12, temperature=0.0)]))
    ids = free.output_ids
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    s.eos_token_id = ids[k]
    [server] = run(engine.generate([req([5, 6], k + 1, temperature=0.0)]))  # no EOS known to the client
    assert server.output_ids == ids[: k + 1] and server.finish_reason.type == "length"
    named = SGLangEngine(s.url, eos_token_ids=(ids[k],), options=SGLangOptions(**FAST))
    [res] = run(named.generate([req([5, 6], k + 1, temperature=0.0)]))
    assert res.output_ids == ids[: k + 1] and res.output_logprobs == free.output_logprobs[: k + 1]
    assert (res.finish_reason.type, res.finish_reason.matched) == ("stop", ids[k])
    assert res.meta["server_finish_reason"] == "length"
    [roomy] = run(named.generate([req([5, 6], k + 5, temperature=0.0)]))  # the server's own `stop`
    assert (roomy.finish_reason.type, roomy.finish_reason.matched) == ("stop", ids[k])
    assert roomy.output_ids == res.output_ids and "server_finish_reason" not in roomy.meta
    # without eos_token_ids the EOS comes from the served model's folder, read at start()
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[k], 7777]}))
    s.model_path = str(folder)
    served = SGLangEngine(s.url, options=SGLangOptions(**FAST))
    run(served.start(timeout_s=5))
    assert served.eos_token_ids == tuple(sorted((ids[k], 7777)))
    [res] = run(served.generate([req([5, 6], k + 1, temperature=0.0)]))
    assert (res.finish_reason.type, res.finish_reason.matched) == ("stop", ids[k])


@pytest.mark.slow  # compiles the embedded engine
def test_both_engines_report_an_eos_on_the_last_allowed_token_as_stop(tmp_path):
  tiny = qwen3.Qwen3Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
  )
  model = qwen3.Qwen3(tiny, rngs=nnx.Rngs(1))
  write_hf_checkpoint(model, tiny, tmp_path / "base", dtype="float32")
  prompt = [3, 17, 40, 8]
  free = greedy_generate(model, [prompt], max_new_tokens=12)[0]
  k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
  eos = free[k]
  request = req(prompt, k + 1, temperature=0.0)
  [jax_res] = run(JaxEngine(model, eos_token_ids=(eos,)).generate([request]))
  base = str(tmp_path / "base")
  with SGLangDouble(QwenModel(base), model_path=base, eos_token_id=eos) as s:
    engine = SGLangEngine(
      s.url, model_config=dataclasses.replace(tiny, eos_token_id=eos), options=SGLangOptions(**FAST)
    )
    [sgl_res] = run(engine.generate([request]))
  assert jax_res.output_ids == sgl_res.output_ids == free[: k + 1]
  assert (jax_res.finish_reason.type, jax_res.finish_reason.matched) == ("stop", eos)
  assert (sgl_res.finish_reason.type, sgl_res.finish_reason.matched) == ("stop", eos)
  assert sgl_res.meta["server_finish_reason"] == "length"
