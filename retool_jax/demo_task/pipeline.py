"""The CPU demo: SFT a tiny Qwen3 on executed tool-use trajectories, then GRPO it with real sandboxed tool calls.

    figures = run_demo(configs.demo_cpu.get_config())

1. Problems `a * b + c` (`task.py`), disjoint SFT / RL / held-out sets.
2. SFT data: an imperfect teacher played through the real multi-turn loop (`teacher.py`): every interpreter
   output in the data was produced by running the teacher's code in the sandbox.
3. SFT of a from-scratch Qwen3 (character-level tokenizer with the Qwen3 chat format).
4. GRPO on the embedded engine: rollouts call the sandboxed interpreter, rewards are the ReTool reward
   (verified correctness with tool-use shaping), weights are synced to the engine after every update.
5. Held-out evaluation (accuracy, format correctness, tool-use rate) after SFT and after RL.

The run directory holds the tokenizer, the SFT and RL checkpoints, `sft/metrics.jsonl`, `rl/metrics.jsonl`,
their curves, and `results.json` with the figures.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from retool_jax.chat.prompt_contract import record_rollout_contract
from retool_jax.data.batch import TokenBatch
from retool_jax.demo_task.task import make_problems, prompt_ids
from retool_jax.demo_task.teacher import TeacherConfig, teacher_rollouts
from retool_jax.demo_task.tokenizer import build_tokenizer, save_tokenizer
from retool_jax.models.qwen3 import Qwen3, Qwen3Config
from retool_jax.rewards import get_reward
from retool_jax.rollout import JaxEngine, MultiTurnConfig
from retool_jax.rollout.scoring import evaluate
from retool_jax.train import state as state_lib
from retool_jax.train.checkpointing import Checkpointer
from retool_jax.train.metrics import MetricsWriter
from retool_jax.train.rl import RLTrainer
from retool_jax.train.rl_batch import pack_rollouts
from retool_jax.train.rl_config import RLConfig
from retool_jax.train.sft import make_train_step

EVAL_KEYS = ("accuracy", "format_ok", "tool_use_rate", "reward_mean", "response_length")


def _log(msg: str, t0: float) -> None:
  print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def model_config(cfg: ml_collections.ConfigDict, tokenizer: Any) -> Qwen3Config:
  vocab = -(-len(tokenizer) // 64) * 64
  return Qwen3Config(
    vocab_size=vocab,
    bos_token_id=None,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
    **cfg.model.to_dict(),
  )


def sft_rows(rollouts, pad_id: int) -> dict[str, np.ndarray]:
  """The SFT trainer's batch layout for whole trajectories (one per row, right-padded)."""
  tokens = pack_rollouts(rollouts, pad_id=pad_id, length_multiple=8).tokens
  return {**tokens.arrays(), "loss_mask_BT": tokens.loss_mask_BT.astype(np.int32)}


def run_sft(
  cfg: ml_collections.ConfigDict, model: Qwen3, rows: dict[str, np.ndarray], workdir: Path, t0: float
) -> state_lib.TrainState:
  s = cfg.sft
  n = rows["input_ids_BT"].shape[0]
  steps = s.epochs * (n // s.batch_size)
  tx, schedule = state_lib.make_optimizer(s.optim.to_dict(), steps)
  state = state_lib.TrainState.create(model, tx, jax.random.key(cfg.seed))
  step_fn = jax.jit(make_train_step(schedule, grad_accum_steps=1, chunk_size=256), donate_argnums=(0,))
  rng = np.random.default_rng(cfg.seed)
  with MetricsWriter(workdir / "sft", tensorboard=False) as writer:
    for epoch in range(s.epochs):
      order = rng.permutation(n)
      for i in range(n // s.batch_size):
        idx = order[i * s.batch_size : (i + 1) * s.batch_size]
        state, m = step_fn(state, TokenBatch.of({k: jnp.asarray(v[idx]) for k, v in rows.items()}))
        step = int(state.step)
        if step % s.log_every == 0 or step == steps:
          m = jax.device_get(m)
          writer.write(step, {"loss": m["loss"], "grad_norm": m["grad_norm"], "learning_rate": m["learning_rate"]})
      _log(f"SFT epoch {epoch + 1}/{s.epochs}: loss {float(m['loss']):.4f}", t0)
  return state


def _save(directory: Path, state: state_lib.TrainState, model_cfg: Qwen3Config, extra: dict) -> None:
  ckpt = Checkpointer(directory, save_every=1, keep=1, async_save=False)
  ckpt.save(state, model_cfg, extra=extra, force=True)
  ckpt.close()


def _record_contract(folder: Path, tokenizer_dir: Path, multiturn: MultiTurnConfig) -> None:
  # the task's prompts: the bare question (`prompt_ids`), no tool schemas, ReTool <code> calls
  record_rollout_contract(folder, tokenizer_dir, multiturn, tools_in_prompt=False, prompt_style="raw")


def next_commands(workdir: str | Path, default_workdir: str = "runs/demo_cpu") -> list[str]:
  """The chat and evaluation commands for the checkpoints a demo run left in `workdir`."""
  w = Path(workdir).as_posix()
  evaluate = "python -m retool_jax.evaluate --config=configs/eval_demo.py"
  if w != default_workdir:
    evaluate += (
      f" --config.workdir={w}/eval_rl --config.model.checkpoint={w}/rl/checkpoints"
      f" --config.data.path={w}/heldout.jsonl --config.data.tokenizer={w}/tokenizer"
    )
  return [f"python -m retool_jax.chat --checkpoint {w}/rl/checkpoints", evaluate]


def run_demo(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs the whole demo; returns `{"sft": eval, "rl": eval, "timings": ..., "rl_step_time": ...,
  "next_commands": [chat, evaluate]}`."""
  cfg = config
  t0 = time.perf_counter()
  workdir = Path(cfg.workdir)
  for phase in ("sft", "rl"):  # a rerun replaces the previous run's results
    shutil.rmtree(workdir / phase, ignore_errors=True)
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = build_tokenizer()
  save_tokenizer(tokenizer, workdir / "tokenizer")
  timings: dict[str, float] = {}

  heldout = make_problems(cfg.eval.num_problems, seed=cfg.seed + 1)
  with open(
    workdir / "heldout.jsonl", "w"
  ) as f:  # for `python -m retool_jax.evaluate --config=configs/eval_demo.py`
    for i, p in enumerate(heldout):
      f.write(json.dumps({"problem": p.question, "answer": p.answer, "unique_id": f"demo/{i}"}) + "\n")
  sft_problems = make_problems(cfg.sft.num_examples, seed=cfg.seed + 2, exclude=heldout)
  rl_problems = make_problems(cfg.rl_steps * cfg.rl.num_prompts, seed=cfg.seed + 3, exclude=heldout + sft_problems)
  multiturn = MultiTurnConfig.from_config(cfg.rollout)
  from retool_jax.tools import default_registry  # noqa: PLC0415  (starts the sandbox lazily)

  tools = default_registry()
  reward_fn = get_reward(cfg.reward)

  # 1. SFT data from the teacher, tool calls executed in the sandbox.
  teacher = TeacherConfig(**cfg.teacher.to_dict())
  sft_traj = asyncio.run(teacher_rollouts(tokenizer, sft_problems, tools, multiturn, teacher, cfg.seed))
  teacher_acc = float(np.mean([reward_fn(r.text, p.answer).correct for r, p in zip(sft_traj, sft_problems)]))
  timings["sft_data_s"] = time.perf_counter() - t0
  _log(
    f"SFT data: {len(sft_traj)} executed teacher trajectories (teacher accuracy {teacher_acc:.2f}, "
    f"tool use {np.mean([r.tool_calls > 0 for r in sft_traj]):.2f})",
    t0,
  )

  # 2. SFT from scratch.
  model_cfg = model_config(cfg, tokenizer)
  model = Qwen3(model_cfg, rngs=nnx.Rngs(cfg.seed))
  _log(f"model: Qwen3 with {model_cfg.num_params() / 1e6:.2f}M parameters, vocabulary {model_cfg.vocab_size}", t0)
  t = time.perf_counter()
  state = run_sft(cfg, model, sft_rows(sft_traj, tokenizer.pad_token_id), workdir, t0)
  timings["sft_s"] = time.perf_counter() - t
  _save(workdir / "sft" / "checkpoints", state, model_cfg, {"phase": "sft"})
  _record_contract(workdir / "sft", workdir / "tokenizer", multiturn)

  # 3. Held-out evaluation after SFT.
  engine = JaxEngine(
    state.model(),
    tokenizer=tokenizer,
    max_length=multiturn.max_context,
    max_batch_size=cfg.engine.max_batch_size,
    min_batch_bucket=cfg.engine.max_batch_size,
    min_prompt_bucket=64,
    min_new_bucket=32,
    decode_chunk=cfg.engine.decode_chunk,
    batch_window_s=cfg.engine.batch_window_s,
    seed=cfg.seed,
  )
  eval_prompts = [prompt_ids(tokenizer, p) for p in heldout]
  eval_answers = [p.answer for p in heldout]

  def held_out() -> dict[str, float]:
    ev = evaluate(
      engine,
      eval_prompts,
      eval_answers,
      tools,
      _eval_multiturn(multiturn, cfg),
      reward_fn,
      tokenizer,
      samples=cfg.eval.samples,
    )
    return {k: ev[k] for k in EVAL_KEYS}

  t = time.perf_counter()
  after_sft = held_out()
  timings["eval_s"] = time.perf_counter() - t
  _log("after SFT: " + _fmt(after_sft), t0)

  # 4. GRPO with real tool calls.
  rl_cfg = RLConfig.from_config(cfg.rl)
  tx, _ = state_lib.make_optimizer(cfg.rl_optim.to_dict(), cfg.rl_steps * rl_cfg.num_minibatches)
  rl_state = state_lib.TrainState.create(state.model(), tx, jax.random.key(cfg.seed))
  batches = iter(
    [
      [{"prompt": prompt_ids(tokenizer, p), "answer": p.answer} for p in rl_problems[i : i + rl_cfg.num_prompts]]
      for i in range(0, len(rl_problems), rl_cfg.num_prompts)
    ]
  )
  trainer = RLTrainer(
    rl_cfg,
    rl_state,
    engine=engine,
    tokenizer=tokenizer,
    tools=tools,
    multiturn=multiturn,
    reward_fn=reward_fn,
    prompts=batches,
  )
  t = time.perf_counter()
  step_times = []
  with MetricsWriter(workdir / "rl", tensorboard=False) as writer:
    for step in range(1, cfg.rl_steps + 1):
      m = trainer.step()
      writer.write(step, m)
      step_times.append({k: m[k] for k in m if k.startswith("time/")})
      if step % cfg.log_every == 0 or step == cfg.rl_steps:
        _log(
          f"RL step {step}/{cfg.rl_steps}: reward {m['reward_mean']:+.3f} accuracy {m['accuracy']:.3f} "
          f"tool use {m['tool_use_rate']:.2f} clipfrac {m['pg_clipfrac']:.3f} entropy {m['entropy']:.3f} "
          f"({m['perf/step_time_s']:.1f}s)",
          t0,
        )
  trainer.close()
  timings["rl_s"] = time.perf_counter() - t
  _save(workdir / "rl" / "checkpoints", trainer.state, model_cfg, {"phase": "rl"})
  _record_contract(workdir / "rl", workdir / "tokenizer", multiturn)

  # 5. Held-out evaluation after RL.
  after_rl = held_out()
  _log("after RL:  " + _fmt(after_rl), t0)
  timings["total_s"] = time.perf_counter() - t0
  rl_step = {k: float(np.mean([s[k] for s in step_times[1:] or step_times])) for k in step_times[0]}
  figures = {
    "sft": after_sft,
    "rl": after_rl,
    "teacher_accuracy": teacher_acc,
    "timings": timings,
    "rl_step_time": rl_step,
    "next_commands": next_commands(workdir),
  }
  (workdir / "results.json").write_text(json.dumps(figures, indent=2))
  _plots(workdir)
  return figures


def _eval_multiturn(multiturn: MultiTurnConfig, cfg: ml_collections.ConfigDict) -> MultiTurnConfig:
  import dataclasses  # noqa: PLC0415

  return dataclasses.replace(multiturn, temperature=cfg.eval.temperature, seed=cfg.seed + 12345)


def _fmt(ev: dict[str, float]) -> str:
  return (
    f"held-out accuracy {ev['accuracy']:.3f}, format correct {ev['format_ok']:.3f}, "
    f"tool use {ev['tool_use_rate']:.3f}"
  )


def _plots(workdir: Path) -> None:
  from retool_jax.plot import plot_run  # noqa: PLC0415

  plot_run(workdir / "sft")
  plot_run(
    workdir / "rl",
    keys=[
      "reward_mean",
      "accuracy",
      "tool_use_rate",
      "format_ok",
      "pg_clipfrac",
      "entropy",
      "grad_norm",
      "response_length",
      "perf/step_time_s",
    ],
  )
