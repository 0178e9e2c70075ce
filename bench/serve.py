"""What the OpenAI-compatible server costs: the same chat workload through `openai.AsyncOpenAI` over localhost
HTTP (uvicorn, the server in a thread of this process) and through `ChatClient` on the engine directly, in one
run, on a tiny Qwen3 (real Qwen3 tokenizer) on the CPU.

The clients run in a second Python process, as agents beside a server do. `--sessions` conversations run at once, each `--turns` requests long (every request extends its conversation
with a user turn), greedy with `--max-tokens` per reply, so both paths generate the same tokens (checked).
Each path has its own engine (same weights, same slots) and a warm-up pass that compiles its programs first.
Reported per path: wall time, requests/s, generated tokens/s; then the server's overhead against the direct
path (goal: under 10% at 16 sessions).

    python bench/serve.py [--sessions 16] [--turns 4] [--max-tokens 32] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402
import uvicorn  # noqa: E402
from flax import nnx  # noqa: E402

from retool_jax.assets import QWEN3_TOKENIZER_DIR  # noqa: E402
from retool_jax.chat.tokenizer import load_tokenizer  # noqa: E402
from retool_jax.models import qwen3  # noqa: E402
from retool_jax.rollout import JaxEngine, MultiTurnConfig  # noqa: E402
from retool_jax.rollout.agentic import ChatClient  # noqa: E402
from retool_jax.serve import ServeBackend, ServeSettings, create_app  # noqa: E402

TOK = load_tokenizer(QWEN3_TOKENIZER_DIR)


def questions(n: int, offset: int = 0) -> list[str]:
  return [f"Conversation {i + offset}: tell me about the number {7 * (i + offset) + 3}." for i in range(n)]


def follow_up(turn: int) -> str:
  return f"Go on with point {turn + 2}."


async def direct(engine, config, qs, turns, max_tokens) -> tuple[float, int, list[str]]:
  """Every conversation on its own `ChatClient` over the engine; returns wall s, tokens, replies."""

  async def one(q):
    client = ChatClient(engine, TOK, config)
    messages, tokens, texts = [{"role": "user", "content": q}], 0, []
    for t in range(turns):
      reply = await client.chat(messages, max_tokens=max_tokens, temperature=0.0)
      tokens += len(client.last_result.output_ids)
      texts.append(reply["content"])
      messages += [reply, {"role": "user", "content": follow_up(t)}]
    return tokens, texts

  start = time.perf_counter()
  done = await asyncio.gather(*(one(q) for q in qs))
  return time.perf_counter() - start, sum(t for t, _ in done), [x for _, texts in done for x in texts]


async def over_http(url, qs, turns, max_tokens) -> tuple[float, int, list[str]]:
  """Every conversation as an OpenAI client on its own session of the server."""

  async def one(i, q):
    client = openai.AsyncOpenAI(
      base_url=f"{url}/sessions/{i}-{q[:14].replace(' ', '_')}/v1", api_key="none", max_retries=0
    )
    messages, tokens, texts = [{"role": "user", "content": q}], 0, []
    for t in range(turns):
      r = await client.chat.completions.create(
        model="bench", messages=messages, max_tokens=max_tokens, temperature=0.0
      )
      tokens += r.usage.completion_tokens
      m = r.choices[0].message
      texts.append(m.content)
      messages += [m.model_dump(exclude_none=True), {"role": "user", "content": follow_up(t)}]
    await client.close()
    return tokens, texts

  start = time.perf_counter()
  done = await asyncio.gather(*(one(i, q) for i, q in enumerate(qs)))
  return time.perf_counter() - start, sum(t for t, _ in done), [x for _, texts in done for x in texts]


def busy_timed(engine: JaxEngine) -> JaxEngine:
  """Adds `stats["busy_s"]`: seconds the engine spent in its device steps (prefill and decode)."""
  step = engine._slot_step
  engine.stats["busy_s"] = 0.0

  def timed():
    start = time.perf_counter()
    try:
      return step()
    finally:
      engine.stats["busy_s"] += time.perf_counter() - start

  engine._slot_step = timed
  return engine


def serve_in_thread(app) -> tuple[str, uvicorn.Server, threading.Thread]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.01)
  return f"http://127.0.0.1:{port}", server, thread


def clients_in_subprocess(url: str, qs: list[str], turns: int, max_tokens: int) -> tuple[float, int, list[str]]:
  """`over_http` run by another Python process (as agents run beside a server), timed there."""
  cmd = [sys.executable, __file__, "--clients-of", url, "--turns", str(turns), "--max-tokens", str(max_tokens)]
  out = subprocess.run(cmd, input=json.dumps(qs), capture_output=True, text=True, check=True)
  wall, tokens, texts = json.loads(out.stdout.strip().splitlines()[-1])
  return wall, tokens, texts


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients-of", default=None, help=argparse.SUPPRESS)  # the client process of the server run
  p.add_argument("--sessions", type=int, default=16)
  p.add_argument("--turns", type=int, default=4)
  p.add_argument("--max-tokens", type=int, default=32)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument(
    "--window-ms", type=float, default=10.0, help="the engines' admission window (the server's default)"
  )
  args = p.parse_args()
  if args.clients_of:
    qs = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(over_http(args.clients_of, qs, args.turns, args.max_tokens))))
    return
  cfg = qwen3.Qwen3Config(
    vocab_size=len(TOK),
    hidden_size=args.hidden,
    intermediate_size=2 * args.hidden,
    num_hidden_layers=args.layers,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=args.hidden // 4,
    tie_word_embeddings=True,
  )
  model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
  context = 1024
  config = MultiTurnConfig(max_context=context, enable_thinking=False)

  def engine():
    return busy_timed(
      JaxEngine(
        model,
        tokenizer=TOK,
        max_length=context,
        max_batch_size=args.sessions,
        admission_window_s=args.window_ms / 1e3,
      )
    )

  n, turns, k = args.sessions, args.turns, args.max_tokens
  print(
    f"tiny Qwen3 hidden={args.hidden} layers={args.layers} vocab={len(TOK)}; {n} sessions x {turns} turns x {k} tokens"
  )
  direct_engine = engine()
  asyncio.run(direct(direct_engine, config, questions(n, 1000), turns, k))  # warm-up: compile
  backend = ServeBackend(engine(), TOK, ServeSettings(config, max_pending=None), model_name="bench")
  url, server, thread = serve_in_thread(create_app(backend))
  try:
    clients_in_subprocess(url, questions(n, 1000), turns, k)
    rows, steps = {}, {}
    for name, eng, run in (
      (
        "engine (ChatClient, in process)",
        direct_engine,
        lambda: direct(direct_engine, config, questions(n), turns, k),
      ),
      ("server (openai client, HTTP)", backend.engine, None),
    ):
      before = dict(eng.stats)
      rows[name] = asyncio.run(run()) if run else clients_in_subprocess(url, questions(n), turns, k)
      steps[name] = {key: eng.stats[key] - before[key] for key in ("decode_chunks", "prefill_calls", "busy_s")}
  finally:
    server.should_exit = True
    thread.join(10)
  (d_wall, d_tok, d_txt), (s_wall, s_tok, s_txt) = rows.values()
  print(
    f"{'path':34s} {'wall s':>8s} {'req/s':>8s} {'tok/s':>8s} {'engine busy s':>14s} {'decode calls':>13s} "
    f"{'prefill calls':>14s}"
  )
  for name, (wall, tokens, _) in rows.items():
    st = steps[name]
    print(
      f"{name:34s} {wall:8.2f} {n * turns / wall:8.2f} {tokens / wall:8.1f} {st['busy_s']:14.2f} "
      f"{st['decode_chunks']:13d} "
      f"{st['prefill_calls']:14d}"
    )
  same = d_txt == s_txt and d_tok == s_tok
  print(
    f"same replies on both paths: {same} ({d_tok} tokens each)"
    if same
    else f"replies differ: {d_tok} vs {s_tok} tokens"
  )
  ratio = s_wall / d_wall
  print(f"server / engine wall time: {ratio:.3f}x  (overhead {100 * (ratio - 1):+.1f}%; goal < +10%)")


if __name__ == "__main__":
  main()
