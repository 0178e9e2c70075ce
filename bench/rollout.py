"""Rollout benchmark, one run, two measurements on the same tiny random Qwen3 (CPU):

1. Decode throughput of the embedded `JaxEngine` against Hugging Face `generate` (greedy, same weights, same
   batch of prompts, no EOS), in generated tokens per second.
2. Wall time of a batch of multi-turn agent rollouts through the `JaxEngine` where every turn is followed by a
   tool call taking 100 ms: tools overlapped with other trajectories' generation (asyncio) against tools run
   sequentially (blocking the batch), both against the same rollouts with an instant tool.

    python bench/rollout.py [--batch 8] [--new-tokens 128] [--trajectories 8] [--turns 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import Qwen3Config as HFQwen3Config  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402

from retool_jax.assets import QWEN3_TOKENIZER_DIR  # noqa: E402
from retool_jax.chat import load_tokenizer  # noqa: E402
from retool_jax.models import qwen3, qwen3_hf  # noqa: E402
from retool_jax.rollout import GenerateRequest, JaxEngine, MultiTurnConfig, SamplingParams, run_agent  # noqa: E402

TINY = dict(
  vocab_size=4096,
  hidden_size=128,
  intermediate_size=384,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=32,
  tie_word_embeddings=True,
)


def tiny_models(tmp: str):
  torch.manual_seed(0)
  hf = Qwen3ForCausalLM(HFQwen3Config(**TINY, max_position_embeddings=4096, attn_implementation="sdpa")).eval()
  hf.save_pretrained(tmp)
  return hf, qwen3_hf.load_hf(tmp)


def bench_decode(hf, model, batch: int, new_tokens: int, prompt_len: int = 32) -> tuple[float, float]:
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, TINY["vocab_size"], (batch, prompt_len)).tolist()
  engine = JaxEngine(model, eos_token_ids=(), max_batch_size=batch)
  sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)

  def ours():
    return asyncio.run(engine.generate([GenerateRequest(tuple(p), sampling) for p in prompts]))

  def theirs():
    with torch.no_grad():
      return hf.generate(
        torch.tensor(prompts),
        attention_mask=torch.ones(batch, prompt_len, dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )

  ours(), theirs()  # compile / warm up
  rates = []
  for fn in (ours, theirs):
    t0 = time.perf_counter()
    for _ in range(3):
      fn()
    rates.append(3 * batch * new_tokens / (time.perf_counter() - t0))
  got, ref = ours(), theirs()[:, prompt_len:].tolist()
  same = sum(r.output_ids == x for r, x in zip(got, ref))
  print(f"  greedy outputs identical to HF generate: {same}/{batch} rows")
  return rates[0], rates[1]


def tool_agent(tool_s: float, turns: int, turn_tokens: list[int], blocking: bool):
  """Each turn generates (real engine), then calls a tool taking `tool_s` and answers with its result."""

  async def agent(client, index, tools):
    messages = [{"role": "user", "content": f"problem {index}"}]
    for t in range(turns):
      reply = await client.chat(messages, max_tokens=turn_tokens[(index + t) % len(turn_tokens)])
      start = time.perf_counter()
      if blocking:
        time.sleep(tool_s)
      else:
        await asyncio.sleep(tool_s)
      client.record_tool_stats(1, 0, time.perf_counter() - start)
      messages += [reply, {"role": "tool", "content": f"result {t}"}]
    return messages

  return agent


def bench_multiturn(model, tokenizer, trajectories: int, turns: int) -> dict[str, float]:
  engine = JaxEngine(
    model,
    tokenizer=tokenizer,
    eos_token_ids=(),
    max_batch_size=trajectories,
    min_batch_bucket=trajectories,
    min_prompt_bucket=64,
    min_new_bucket=64,
  )
  config = MultiTurnConfig(max_context=2048, temperature=1.0, seed=0)
  lengths = [24, 48, 32, 64, 40, 56]
  prompts = list(range(trajectories))
  walls = {}
  for name, tool_s, blocking in [
    ("warmup", 0.0, False),
    ("no tool", 0.0, False),
    ("overlapped", 0.1, False),
    ("sequential", 0.1, True),
  ]:
    t0 = time.perf_counter()
    outs = asyncio.run(run_agent(engine, tool_agent(tool_s, turns, lengths, blocking), prompts, None, config))
    walls[name] = time.perf_counter() - t0
    assert all(o.status == "completed" for o in outs), [o.error for o in outs]
  del walls["warmup"]
  return walls


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--trajectories", type=int, default=8)
  parser.add_argument("--turns", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  with tempfile.TemporaryDirectory() as tmp:
    hf, model = tiny_models(tmp)
  print(f"tiny Qwen3 {TINY}, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters, CPU")

  print(f"1. decode, batch {args.batch}, 32-token prompts, {args.new_tokens} new tokens, greedy")
  ours, theirs = bench_decode(hf, model, args.batch, args.new_tokens)
  print(
    f"  JaxEngine {ours:,.0f} tok/s | HF generate {theirs:,.0f} tok/s | ratio {ours / theirs:.2f}x (goal >= 3x)"
  )

  tokenizer = load_tokenizer(QWEN3_TOKENIZER_DIR)
  big = qwen3.Qwen3Config(**{**TINY, "vocab_size": len(tokenizer)})
  agent_model = qwen3.Qwen3(big, rngs=nnx.Rngs(0))
  print(
    f"2. multi-turn: {args.trajectories} agent rollouts x {args.turns} turns (24-64 tokens each), "
    "real tokenizer, tool 100 ms after every turn"
  )
  walls = bench_multiturn(agent_model, tokenizer, args.trajectories, args.turns)
  base = walls["no tool"]
  for name, wall in walls.items():
    print(f"  {name:<11} {wall:6.2f} s  ({wall / base:.2f}x the no-tool wall time)")
  print(
    f"  overlapped / no tool = {walls['overlapped'] / base:.2f}x (goal <= 1.2x); "
    f"sequential / overlapped = {walls['sequential'] / walls['overlapped']:.2f}x"
  )


if __name__ == "__main__":
  main()
