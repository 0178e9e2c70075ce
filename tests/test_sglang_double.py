"""The SGLang double answers like SGLang's documented HTTP API (checked with plain `requests`)."""

import json
import threading
import time

import numpy as np
import pytest
import requests

from sglang_double import SGLangDouble, detokenize, encode


@pytest.fixture
def server():
  with SGLangDouble() as s:
    yield s


def post(s, path, body=None, timeout=10):
  return requests.post(s.url + path, json=body, timeout=timeout)


def greedy(max_new=8, **extra):
  return {"temperature": 0, "max_new_tokens": max_new, **extra}


def test_input_ids_single_answers_one_object_with_logprob_triples(server):
  r = post(
    server,
    "/generate",
    {"input_ids": [5, 6, 7], "sampling_params": greedy(6, ignore_eos=True), "return_logprob": True},
  )
  assert r.status_code == 200
  out = r.json()
  assert isinstance(out, dict) and set(out) == {"text", "output_ids", "meta_info"}
  meta = out["meta_info"]
  triples = meta["output_token_logprobs"]
  assert [t[1] for t in triples] == out["output_ids"] and len(triples) == 6
  assert all(t[0] <= 0 and t[2] is None for t in triples)
  assert meta["finish_reason"] == {"type": "length", "length": 6}
  assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 6 and meta["weight_version"] == "default"
  assert out["text"] == detokenize(out["output_ids"], skip_special_tokens=True)


def test_no_logprobs_unless_asked(server):
  out = post(server, "/generate", {"input_ids": [5, 6], "sampling_params": greedy(3)}).json()
  assert "output_token_logprobs" not in out["meta_info"]


def test_greedy_logprob_is_log_softmax_of_the_logits(server):
  out = post(
    server,
    "/generate",
    {"input_ids": [9, 10], "sampling_params": greedy(3, ignore_eos=True), "return_logprob": True},
  ).json()
  ids = [9, 10]
  for lp, tok, _ in out["meta_info"]["output_token_logprobs"]:
    logits = server.model.logits(ids)
    assert tok == int(np.argmax(logits))
    assert lp == pytest.approx(float(logits[tok] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()))
    ids.append(tok)


def test_sampled_logprob_is_of_the_temperature_scaled_logits_before_top_k(server):
  params = {
    "temperature": 0.7,
    "top_k": 3,
    "top_p": 0.9,
    "max_new_tokens": 8,
    "ignore_eos": True,
    "sampling_seed": 1,
  }
  out = post(server, "/generate", {"input_ids": [9, 10], "sampling_params": params, "return_logprob": True}).json()
  ids = [9, 10]
  for lp, tok, _ in out["meta_info"]["output_token_logprobs"]:
    scaled = server.model.logits(ids) / 0.7
    assert tok in np.argsort(-scaled)[:3]  # drawn from the top-k ...
    want = scaled[tok] - scaled.max() - np.log(np.exp(scaled - scaled.max()).sum())
    assert lp == pytest.approx(float(want))  # ... but scored over the whole vocabulary
    ids.append(tok)


def test_text_and_batches_answer_lists_in_prompt_major_order(server):
  single = post(server, "/generate", {"text": "hello", "sampling_params": greedy(4, ignore_eos=True)}).json()
  assert isinstance(single, dict) and single["meta_info"]["prompt_tokens"] == len(encode("hello"))
  batch = post(
    server, "/generate", {"text": ["hello", "hi"], "sampling_params": greedy(4, ignore_eos=True)}
  ).json()
  assert isinstance(batch, list) and len(batch) == 2
  assert batch[0]["output_ids"] == single["output_ids"]
  prompts = [[5, 6, 7], [8]]
  alone = [
    post(server, "/generate", {"input_ids": p, "sampling_params": greedy(4, ignore_eos=True)}).json()
    for p in prompts
  ]
  outs = post(
    server, "/generate", {"input_ids": prompts, "sampling_params": greedy(4, ignore_eos=True, n=2)}
  ).json()
  assert len(outs) == 4
  assert [o["meta_info"]["prompt_tokens"] for o in outs] == [3, 3, 1, 1]
  assert [o["output_ids"] for o in outs] == [alone[0]["output_ids"]] * 2 + [alone[1]["output_ids"]] * 2
  one_prompt_n = post(server, "/generate", {"input_ids": [5], "sampling_params": greedy(2, n=3)}).json()
  assert isinstance(one_prompt_n, list) and len(one_prompt_n) == 3


def test_sampling_seed_repeats_and_n_samples_differ(server):
  body = {
    "input_ids": [5, 6],
    "sampling_params": {"max_new_tokens": 12, "temperature": 1.0, "sampling_seed": 3, "ignore_eos": True, "n": 2},
    "return_logprob": True,
  }
  a, b = post(server, "/generate", body).json(), post(server, "/generate", body).json()
  assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
  assert a[0]["output_ids"] != a[1]["output_ids"]


def test_stop_string_trims_text_but_not_ids_or_logprobs(server):
  free = post(
    server,
    "/generate",
    {"input_ids": [5, 6, 7], "sampling_params": greedy(20, ignore_eos=True), "return_logprob": True},
  ).json()
  text = detokenize(free["output_ids"], skip_special_tokens=False)
  stop = text[3:5]
  trimmed = post(
    server,
    "/generate",
    {"input_ids": [5, 6, 7], "return_logprob": True, "sampling_params": greedy(20, ignore_eos=True, stop=[stop])},
  ).json()
  kept = post(
    server,
    "/generate",
    {
      "input_ids": [5, 6, 7],
      "return_logprob": True,
      "sampling_params": greedy(20, ignore_eos=True, stop=[stop], no_stop_trim=True),
    },
  ).json()
  assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
  assert trimmed["output_ids"] == kept["output_ids"] == free["output_ids"][: len(trimmed["output_ids"])]
  assert stop in detokenize(trimmed["output_ids"], skip_special_tokens=False)
  assert kept["text"] == detokenize(kept["output_ids"], skip_special_tokens=True) and stop in kept["text"]
  assert trimmed["text"] == kept["text"][: kept["text"].find(stop)]
  assert len(trimmed["meta_info"]["output_token_logprobs"]) == len(trimmed["output_ids"])


def test_stop_token_id_is_matched_as_int_and_kept_and_ignore_eos_skips_it():
  with SGLangDouble(eos_token_id=-1) as s:
    free = post(s, "/generate", {"input_ids": [11], "sampling_params": greedy(6)}).json()
    stop_tok = free["output_ids"][2]
    out = post(s, "/generate", {"input_ids": [11], "sampling_params": greedy(6, stop_token_ids=[stop_tok])}).json()
    first = free["output_ids"].index(stop_tok)
    assert out["output_ids"] == free["output_ids"][: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    # SGLang skips every token-based stop (EOS and stop_token_ids) under ignore_eos
    ignored = post(
      s, "/generate", {"input_ids": [11], "sampling_params": greedy(6, stop_token_ids=[stop_tok], ignore_eos=True)}
    ).json()
    assert ignored["output_ids"] == free["output_ids"]


def test_the_budget_is_checked_before_stops():
  """A stop token or stop string on the last allowed token is answered as `length`, as SGLang does."""
  with SGLangDouble(eos_token_id=-1) as server:
    free = post(
      server,
      "/generate",
      {"input_ids": [5, 6], "sampling_params": greedy(12, ignore_eos=True), "return_logprob": True},
    ).json()
    ids = free["output_ids"]
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    at_budget = post(
      server, "/generate", {"input_ids": [5, 6], "sampling_params": greedy(k + 1, stop_token_ids=[ids[k]])}
    ).json()
    assert at_budget["output_ids"] == ids[: k + 1]
    assert at_budget["meta_info"]["finish_reason"] == {"type": "length", "length": k + 1}
    text = detokenize(ids, skip_special_tokens=False)
    j = next(
      i
      for i in range(1, len(ids))
      if (stop := detokenize(ids[i - 1 : i + 1], False)) not in detokenize(ids[:i], False) and stop.strip()
    )
    stop = detokenize(ids[j - 1 : j + 1], False)
    assert stop in text
    string_at_budget = post(
      server, "/generate", {"input_ids": [5, 6], "sampling_params": greedy(j + 1, stop=[stop], ignore_eos=True)}
    ).json()
    assert string_at_budget["meta_info"]["finish_reason"] == {"type": "length", "length": j + 1}
    roomier = post(
      server, "/generate", {"input_ids": [5, 6], "sampling_params": greedy(j + 5, stop=[stop], ignore_eos=True)}
    ).json()
    assert roomier["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert roomier["output_ids"] == string_at_budget["output_ids"] == ids[: j + 1]


def test_too_long_requests_are_400_with_an_error_message(server):
  r = post(server, "/generate", {"input_ids": [5] * 60, "sampling_params": greedy(4)})
  assert r.status_code == 400 and "maximum context length of 64 tokens" in r.json()["error"]["message"]
  r = post(server, "/generate", {"input_ids": [5] * 64, "sampling_params": greedy(1)})
  assert r.status_code == 400 and "is longer than the model's context length" in r.json()["error"]["message"]
  assert post(server, "/generate", {"input_ids": [5] * 59, "sampling_params": greedy(4)}).status_code == 200


def test_an_abort_is_http_200_with_partial_tokens(server):
  server.abort_next, server.abort_after_tokens = 1, 2
  r = post(
    server, "/generate", {"input_ids": [5], "sampling_params": greedy(8, ignore_eos=True), "return_logprob": True}
  )
  assert r.status_code == 200
  meta = r.json()["meta_info"]
  assert meta["finish_reason"]["type"] == "abort" and "message" in meta["finish_reason"]
  assert len(r.json()["output_ids"]) == 2 == len(meta["output_token_logprobs"])


def test_health_is_503_until_ready():
  with SGLangDouble(ready=False) as s:
    assert requests.get(s.url + "/health_generate", timeout=5).status_code == 503
    s.ready = True
    assert requests.get(s.url + "/health_generate", timeout=5).status_code == 200
    info = requests.get(s.url + "/get_model_info", timeout=5).json()
    assert info["is_generation"] is True and info["weight_version"] == "default"
    models = requests.get(s.url + "/v1/models", timeout=5).json()
    assert models["object"] == "list" and models["data"][0]["max_model_len"] == 64


def _in_thread(fn):
  box = {}
  t = threading.Thread(target=lambda: box.setdefault("r", fn()))
  t.start()
  return t, box


def test_pause_aborts_running_requests_and_holds_new_ones_until_continue():
  with SGLangDouble(token_delay_s=0.01) as s:
    body = {"input_ids": [5], "sampling_params": greedy(40, ignore_eos=True), "return_logprob": True}
    t1, running = _in_thread(lambda: post(s, "/generate", body).json())
    while not s.running:
      time.sleep(0.005)
    assert post(s, "/pause_generation", {"mode": "abort"}).json()["status"] == "ok"
    t1.join(5)
    assert running["r"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(running["r"]["output_ids"]) < 40
    t2, held = _in_thread(lambda: post(s, "/generate", {**body, "sampling_params": greedy(2)}).json())
    time.sleep(0.2)
    assert t2.is_alive() and "r" not in held
    assert post(s, "/continue_generation", {}).status_code == 200
    t2.join(5)
    assert held["r"]["meta_info"]["finish_reason"]["type"] in ("length", "stop")


def test_flush_cache_is_400_while_busy():
  with SGLangDouble(token_delay_s=0.01) as s:
    assert post(s, "/flush_cache").status_code == 200
    t, _ = _in_thread(
      lambda: post(s, "/generate", {"input_ids": [5], "sampling_params": greedy(20, ignore_eos=True)})
    )
    while not s.running:
      time.sleep(0.005)
    assert post(s, "/flush_cache").status_code == 400
    t.join(5)
    assert post(s, "/flush_cache").status_code == 200


def test_update_weights_from_disk_answers_success_and_message(server, tmp_path):
  bad = post(server, "/update_weights_from_disk", {"model_path": str(tmp_path / "missing"), "weight_version": "3"})
  assert bad.status_code == 400 and bad.json()["success"] is False and "missing" in bad.json()["message"]
  ckpt = tmp_path / "weight_v3"
  ckpt.mkdir()
  (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
  (ckpt / "model.safetensors").write_bytes(b"new weights")
  before = post(server, "/generate", {"input_ids": [5], "sampling_params": greedy(6, ignore_eos=True)}).json()
  ok = post(server, "/update_weights_from_disk", {"model_path": str(ckpt), "weight_version": "3"})
  assert ok.status_code == 200 and ok.json()["success"] is True and set(ok.json()) >= {"message"}
  after = post(server, "/generate", {"input_ids": [5], "sampling_params": greedy(6, ignore_eos=True)}).json()
  assert after["meta_info"]["weight_version"] == "3" and after["output_ids"] != before["output_ids"]
  info = requests.get(server.url + "/get_model_info", timeout=5).json()
  assert info["weight_version"] == "3" and info["model_path"] == str(ckpt)


def _wait(cond, timeout_s=10.0):
  deadline = time.monotonic() + timeout_s
  while not cond():
    assert time.monotonic() < deadline, "condition not reached in time"
    time.sleep(0.005)


def test_a_live_rid_is_refused_as_a_duplicate_until_it_ends():
  with SGLangDouble(token_delay_s=0.01) as s:
    body = {"input_ids": [5], "rid": "a", "sampling_params": greedy(30, ignore_eos=True)}
    t, first = _in_thread(lambda: post(s, "/generate", body).json())
    _wait(lambda: "a" in s.running)
    again = post(s, "/generate", {**body, "sampling_params": greedy(2)})
    assert again.status_code == 400 and again.json() == {"error": {"message": "Duplicate request ID detected: a"}}
    t.join(5)
    assert first["r"]["meta_info"]["finish_reason"]["type"] == "length"
    assert post(s, "/generate", {**body, "sampling_params": greedy(2)}).status_code == 200  # no longer live
    twice = post(s, "/generate", {"input_ids": [[5], [6]], "rid": ["b", "b"], "sampling_params": greedy(2)})
    assert twice.status_code == 400 and "Duplicate request IDs detected within the request" in twice.text


def test_abort_request_aborts_live_rids_by_prefix_and_ignores_unknown_ones():
  with SGLangDouble(token_delay_s=0.03) as s:
    threads = {
      rid: _in_thread(
        lambda rid=rid: post(
          s, "/generate", {"input_ids": [5], "rid": rid, "sampling_params": greedy(40, ignore_eos=True)}
        ).json()
      )
      for rid in ("x", "x-retry1", "y")
    }
    _wait(lambda: len(s.running) == 3)
    r = post(s, "/abort_request", {"rid": "nope"})
    assert r.status_code == 200 and r.text == "" and len(s.running) == 3
    assert post(s, "/abort_request", {"rid": "x"}).status_code == 200
    for rid in ("x", "x-retry1"):
      threads[rid][0].join(5)
      meta = threads[rid][1]["r"]["meta_info"]
      assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 40
    assert "y" in s.running
    assert post(s, "/abort_request", {"rid": "", "abort_all": True}).status_code == 200
    threads["y"][0].join(5)
    assert threads["y"][1]["r"]["meta_info"]["finish_reason"]["type"] == "abort" and not s.running


def test_a_held_request_outlives_a_client_that_gave_up():
  with SGLangDouble() as s:
    s.hold_next, s.hold_s = 1, 2.0
    body = {"input_ids": [5], "rid": "h", "sampling_params": greedy(3, ignore_eos=True)}
    with pytest.raises(requests.Timeout):
      post(s, "/generate", body, timeout=0.1)
    assert "h" in s.running  # still held, and still registered under its rid
    assert post(s, "/generate", body).status_code == 400
    _wait(lambda: "h" in s.finished)
    assert s.finished["h"] == {"type": "length", "length": 3}


def _checkpoint(tmp_path, name="weight_v1"):
  ckpt = tmp_path / name
  ckpt.mkdir()
  (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
  (ckpt / "model.safetensors").write_bytes(b"new weights")
  return str(ckpt)


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_kept_pauses_freeze_requests_and_block_flushes_until_they_finish(tmp_path, mode):
  ckpt = _checkpoint(tmp_path)
  with SGLangDouble(token_delay_s=0.02) as s:
    body = {"input_ids": [5], "rid": "k", "sampling_params": greedy(50, ignore_eos=True)}
    t, kept = _in_thread(lambda: post(s, "/generate", body).json())
    _wait(lambda: "k" in s.running)
    assert post(s, "/pause_generation", {"mode": mode}).json()["status"] == "ok"
    assert post(s, "/flush_cache").status_code == 400  # kept requests are still in the scheduler
    t2, new = _in_thread(lambda: post(s, "/generate", {**body, "rid": "n", "sampling_params": greedy(2)}).json())
    time.sleep(0.2)
    assert t.is_alive() and t2.is_alive() and "n" not in s.running  # frozen, and new requests wait
    ok = post(s, "/update_weights_from_disk", {"model_path": ckpt, "weight_version": "1", "flush_cache": False})
    assert ok.status_code == 200 and ok.json()["success"] is True  # paused: loaded at once, kept requests stay
    assert post(s, "/continue_generation", {}).status_code == 200
    t.join(5), t2.join(5)
    assert kept["r"]["meta_info"]["finish_reason"]["type"] == "length" and len(kept["r"]["output_ids"]) == 50
    assert kept["r"]["meta_info"]["weight_version"] == "1" and new["r"]["meta_info"]["weight_version"] == "1"
    assert post(s, "/flush_cache").status_code == 200


def test_an_update_that_must_flush_under_kept_requests_takes_the_server_down(tmp_path):
  ckpt = _checkpoint(tmp_path)
  with SGLangDouble(token_delay_s=0.01) as s:
    t, _ = _in_thread(
      lambda: post(s, "/generate", {"input_ids": [5], "sampling_params": greedy(30, ignore_eos=True)})
    )
    _wait(lambda: s.running)
    post(s, "/pause_generation", {"mode": "retract"})
    r = post(s, "/update_weights_from_disk", {"model_path": ckpt, "weight_version": "1"})
    assert r.status_code == 500 and "Cache flush failed after updating weights" in r.json()["error"]["message"]
    assert requests.get(s.url + "/health_generate", timeout=5).status_code == 503
    post(s, "/continue_generation", {})
    t.join(5)


def test_an_unpaused_update_waits_for_running_requests_and_abort_all_requests_ends_them(tmp_path):
  ckpt = _checkpoint(tmp_path)
  with SGLangDouble(token_delay_s=0.03) as s:
    t, running = _in_thread(
      lambda: post(s, "/generate", {"input_ids": [5], "sampling_params": greedy(15, ignore_eos=True)}).json()
    )
    _wait(lambda: s.running)
    assert post(s, "/update_weights_from_disk", {"model_path": ckpt}).json()["success"] is True
    t.join(5)
    assert running["r"]["meta_info"]["finish_reason"]["type"] == "length"  # it ran to the end first
    t, running = _in_thread(
      lambda: post(s, "/generate", {"input_ids": [5], "sampling_params": greedy(60, ignore_eos=True)}).json()
    )
    _wait(lambda: s.running)
    r = post(s, "/update_weights_from_disk", {"model_path": ckpt, "abort_all_requests": True})
    t.join(5)
    assert r.json()["success"] is True and running["r"]["meta_info"]["finish_reason"]["type"] == "abort"


def test_slow_and_failing_workers_and_the_event_record(tmp_path):
  ckpt = _checkpoint(tmp_path)
  with SGLangDouble() as s:
    s.fail_update = "Failed to update weights: disk quota exceeded."
    start = time.monotonic()
    r = post(s, "/update_weights_from_disk", {"model_path": ckpt, "weight_version": "1"})
    assert r.status_code == 400 and r.json() == {
      "success": False,
      "message": "Failed to update weights: disk quota exceeded.",
      "num_paused_requests": 0,
    }
    assert time.monotonic() - start < 0.3 and s.weight_version == "default"
    s.fail_update, s.update_delay_s = None, 0.3
    start = time.monotonic()
    assert post(s, "/update_weights_from_disk", {"model_path": ckpt, "weight_version": "1"}).json()["success"]
    assert time.monotonic() - start >= 0.3 and s.weight_version == "1"
    assert [(p, phase) for _, p, phase in s.events] == [
      ("/update_weights_from_disk", "start"),
      ("/update_weights_from_disk", "end"),
    ] * 2
