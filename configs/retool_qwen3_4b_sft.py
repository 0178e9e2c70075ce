"""ReTool cold-start SFT of Qwen3-4B on ReTool-SFT-format data (code-interpreter reasoning traces).

    python -m retool_jax.train --config=configs/retool_qwen3_4b_sft.py \
        --config.model.checkpoint=/ckpt/Qwen3-4B \
        --config.data.path=/data/retool_sft.jsonl --config.workdir=/runs/retool_4b_sft

`model.checkpoint` is a Hugging Face folder or a retool_jax Orbax checkpoint (`python -m retool_jax.convert`).
Rows are `{"messages": [user, assistant]}` with the assistant turn interleaving reasoning, `<code>` blocks,
`<interpreter>` output (never trained) and `<answer>`; `data.style="tool_calls"` trains the same traces as
native Qwen3 tool calls instead. The result exports with `python -m retool_jax.convert --to hf
--src WORKDIR/checkpoints --dst HF_DIR` and is the starting point of the RL stage.

Targets a TPU v5p-8 (4 chips, mesh fsdp=4). Sizing: packed rows of 8192 tokens, 32 rows (about 260k tokens)
per update in 4 micro-batches; float32 master weights and AdamW state (about 48 GB for 4B parameters, sharded
over `fsdp`), bfloat16 compute, full remat, splash attention. `python -m retool_jax.aot
--config=configs/retool_qwen3_4b_sft.py --topology=v5p-8` compiles the train step at 35 GiB of 95.7 per chip.
"""

import ml_collections

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  c = recipes.sft_default()
  c.workdir = "runs/retool_qwen3_4b_sft"
  c.seed = 0
  c.num_steps = 0  # data.num_epochs passes over the packed data
  c.grad_accum_steps = 4

  c.model.checkpoint = ""  # set it: a Qwen3-4B (HF or Orbax) folder (empty: a random 4B, for smoke tests)
  recipes.large_model(c.model, "4B")
  c.model.scan_layers = True  # one decoder layer compiled, scanned over the stack
  c.mesh = recipes.fsdp_mesh()

  c.data.format = "retool_sft"
  c.data.style = "inline"  # ReTool's own <code>/<interpreter> format, as the RL rollouts use
  c.data.enable_thinking = True
  c.data.seq_len = 8192
  c.data.overflow = "drop"  # a truncated trace would teach an unfinished answer
  c.data.global_batch_size = 32
  c.data.num_epochs = 3
  c.data.eval_holdout = 64

  c.optim.schedule = "warmup_cosine"
  c.optim.learning_rate = 1e-5
  c.optim.warmup_steps = 10
  c.optim.end_lr_factor = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 1.0

  c.loss.chunk_size = 1024

  c.eval.every_steps = 25
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 2
  return c
