"""`python -m retool_jax.train` RL with rollouts on an SGLang server (the in-process double serving a real tiny
Qwen3 from disk): the weights reach the server through the disk protocol after every step."""

import json

import jax
import ml_collections
import numpy as np
from flax import nnx

from retool_jax.checkpoint import layout
from retool_jax.demo_task.task import make_problems
from retool_jax.demo_task.tokenizer import build_tokenizer, save_tokenizer
from retool_jax.models.qwen3 import Qwen3
from retool_jax.models.qwen3_hf import load_hf
from retool_jax.rollout.weight_sync import write_hf_checkpoint
from retool_jax.train import check_config
from retool_jax.train.metrics import read_metrics
from retool_jax.train.rl_run import default_config, train
from sglang_double import QwenModel, SGLangDouble
from tiny_qwen3 import tiny_config


def test_rl_run_on_sglang_syncs_weights_through_disk(tmp_path):
  tokenizer = build_tokenizer()
  save_tokenizer(tokenizer, tmp_path / "tokenizer")
  cfg = tiny_config(eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
  policy = tmp_path / "policy"
  write_hf_checkpoint(Qwen3(cfg, rngs=nnx.Rngs(0)), cfg, policy, dtype="float32")
  problems = tmp_path / "problems.jsonl"
  problems.write_text(
    "".join(json.dumps({"problem": p.question, "answer": p.answer}) + "\n" for p in make_problems(8, seed=0))
  )

  c = default_config()
  c.workdir = str(tmp_path / "run")
  c.num_steps = 2
  c.model.checkpoint = str(policy)
  c.model.dtype = "float32"
  c.data.path = str(problems)
  c.data.tokenizer = str(tmp_path / "tokenizer")
  c.data.prompt_style = "problem"
  c.tools = "none"
  c.rollout = ml_collections.ConfigDict(
    dict(max_context=96, max_turns=1, max_new_tokens=8, call_formats=("code",), enable_thinking=False)
  )
  c.rl = ml_collections.ConfigDict(dict(num_prompts=2, group_size=2, length_multiple=32))
  c.optim.learning_rate = 1e-2
  c.engine.sync_dtype = "float32"
  c.checkpoint.async_save = False
  c.log.tensorboard = c.log.progress = False
  served = QwenModel(str(policy), max_len=96)
  with SGLangDouble(served, model_path=str(policy), context_length=128, eos_token_id=tokenizer.eos_token_id) as s:
    c.engine.sglang_url = s.url
    check_config(c)
    train(c)
  assert [r["step"] for r in read_metrics(c.workdir)] == [1, 2]
  assert all(r["response_length"] > 0 for r in read_metrics(c.workdir))  # the server generated them
  updates = [body for path, body in s.log if path == "/update_weights_from_disk"]
  assert [u["weight_version"] for u in updates] == ["1", "2"]
  assert updates[-1]["model_path"] == str(tmp_path / "run" / "weight_sync" / "weight_v2")
  # what the server loaded last is the trained policy of the final checkpoint
  synced = nnx.to_pure_dict(nnx.state(load_hf(updates[-1]["model_path"]), nnx.Param))
  trained = nnx.to_pure_dict(nnx.state(layout.load(tmp_path / "run" / "checkpoints"), nnx.Param))
  start = nnx.to_pure_dict(nnx.state(load_hf(policy), nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, synced, trained)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(start)))
