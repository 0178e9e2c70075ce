"""Full train-step throughput (forward, backward, AdamW) of the JAX Qwen3 against HF PyTorch, same run.

    python bench/model_step.py                # CPU: small config, prints tokens/s for both and the ratio
    python bench/model_step.py --gpu          # NVIDIA GPU: Qwen3-1.7B, bf16, seq 4096, reports MFU

The baseline is `transformers.Qwen3ForCausalLM` with `torch.optim.AdamW` on the same config, batch and data.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from retool_jax.models import qwen3
from retool_jax.models.logprobs import token_logprobs

CPU_CONFIGS = {
  "tiny": dict(
    vocab_size=8192,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
  ),
  "small": dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    tie_word_embeddings=True,
  ),
}
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def jax_train_step_rate(cfg: qwen3.Qwen3Config, batch: int, seq: int, steps: int, warmup: int = 2) -> float:
  model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.01), wrt=nnx.Param)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32))

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, ids):
    def loss_fn(m):
      return -token_logprobs(m, ids[:, :-1], ids[:, 1:], chunk_size=1024).logprobs_BT.mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(warmup):
    train_step(model, optimizer, ids).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = train_step(model, optimizer, ids)
  loss.block_until_ready()
  return batch * seq * steps / (time.perf_counter() - t0)


def torch_train_step_rate(cfg: qwen3.Qwen3Config, batch: int, seq: int, steps: int, warmup: int = 2) -> float:
  import torch  # noqa: PLC0415  (optional: the PyTorch baseline only)
  from transformers import Qwen3Config as HFConfig  # noqa: PLC0415  (the PyTorch baseline only)
  from transformers import Qwen3ForCausalLM  # noqa: PLC0415  (needs torch)

  hf_cfg = cfg.to_hf()
  hf_cfg.pop("architectures"), hf_cfg.pop("model_type")
  hf_cfg.update(bos_token_id=None, eos_token_id=None)
  model = Qwen3ForCausalLM(HFConfig(**hf_cfg, attn_implementation="sdpa")).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  ids = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts labels internally
    loss.backward()
    opt.step()

  for _ in range(warmup):
    step()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  return batch * seq * steps / (time.perf_counter() - t0)


def train_flops_per_token(cfg: qwen3.Qwen3Config, seq: int) -> float:
  """Model FLOPs per trained token, forward + backward: 6 x the matmul parameters a token touches (the output
  projection counted once, tied or not; no embedding lookup; top-k experts only) plus causal attention scores
  and values (12 * layers * heads * head_dim * seq, halved for the causal mask). Recomputation is not counted."""
  attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq
  return 6 * cfg.num_active_params() + attn


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpu", action="store_true", help="Qwen3-1.7B, bf16, seq 4096 on the GPU; report MFU")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--seq", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--remat", default=None, help="remat policy for --gpu (default dots_with_no_batch_dims)")
  parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds per framework")
  parser.add_argument("--no-baseline", action="store_true", help="skip the PyTorch baseline")
  args = parser.parse_args()

  if args.gpu:
    device = jax.devices()[0]
    if device.platform != "gpu":
      raise SystemExit(f"--gpu needs a GPU; JAX sees {device}")
    seq, batch, steps = args.seq or 4096, args.batch or 4, args.steps or 10
    cfg = qwen3.preset(
      "1.7B",
      param_dtype="float32",
      dtype="bfloat16",
      attention_impl="cudnn",
      remat=args.remat or "dots_with_no_batch_dims",
      scan_layers=True,
    )
    rate = jax_train_step_rate(cfg, batch, seq, steps)
    flops = train_flops_per_token(cfg, seq) * rate
    kind = next((k for k in PEAK_BF16_FLOPS if k in device.device_kind), None)
    print(f"device: {device.device_kind}")
    print(
      f"Qwen3-1.7B train step, bf16 compute, batch {batch} x seq {seq}: {rate:,.0f} tokens/s, "
      f"{flops / 1e12:.1f} TFLOP/s"
    )
    if kind:
      print(
        f"MFU: {100 * flops / PEAK_BF16_FLOPS[kind]:.1f}% of {PEAK_BF16_FLOPS[kind] / 1e12:.0f} TFLOP/s dense bf16"
      )
    return

  seq, batch, steps = args.seq or 256, args.batch or 4, args.steps or 4
  print(
    f"batch {batch} x seq {seq}; {steps} timed steps per round; {args.rounds} rounds alternating the two "
    f"frameworks, best round reported; CPU threads: {os.cpu_count()}"
  )
  for name, kw in CPU_CONFIGS.items():
    cfg = qwen3.Qwen3Config(**kw)
    ours, base = [], []
    for _ in range(args.rounds):
      ours.append(jax_train_step_rate(cfg, batch, seq, steps))
      if not args.no_baseline:
        base.append(torch_train_step_rate(cfg, batch, seq, steps))
    line = f"{name:6s} ({cfg.num_params() / 1e6:.1f}M params): retool_jax {max(ours):8,.0f} tokens/s"
    if base:
      line += f" | HF PyTorch {max(base):8,.0f} tokens/s | ratio {max(ours) / max(base):.2f}x"
    print(line, flush=True)


if __name__ == "__main__":
  main()
