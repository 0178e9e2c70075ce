"""The demo's data step: the tokenizer, the teacher's executed trajectories, the RL and held-out problems.

    python -m retool_jax.demo_task.data --workdir=runs/demo_cpu

writes, under the run folder (`DemoFiles`):

* `tokenizer/` and `prompt_contract.json` - the character-level tokenizer and how the prompts are rendered (the
  bare question, no tool schemas, ReTool `<code>` calls), found by the chat and evaluate for every checkpoint
  below the run folder;
* `data/sft_tokens.jsonl` - `{input_ids, loss_mask}` rows (the SFT trainer's `tokens` format): the teacher played
  through the real multi-turn loop, every interpreter output produced by running its code in the sandbox;
* `data/rl_problems.jsonl`, `heldout.jsonl` - `{problem, answer, unique_id}` rows (`retool_jax.data.load_math`);
* `data/summary.json` - the counts and the teacher's accuracy and tool use.

Problems are disjoint between the three sets; their seeds follow `config.seed` (see `demo_config`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags

from retool_jax.chat.prompt_contract import record_rollout_contract
from retool_jax.demo_task.config import DemoFiles, demo_config
from retool_jax.demo_task.task import Problem, make_problems
from retool_jax.demo_task.teacher import TeacherConfig, teacher_rollouts
from retool_jax.demo_task.tokenizer import build_tokenizer, save_tokenizer
from retool_jax.rewards import get_reward
from retool_jax.rollout import MultiTurnConfig
from retool_jax.tools import default_registry


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def problem_rows(problems: Sequence[Problem], prefix: str) -> list[dict[str, str]]:
  """The problems as `load_math` rows."""
  return [
    {"problem": p.question, "answer": p.answer, "unique_id": f"{prefix}/{i}"} for i, p in enumerate(problems)
  ]


def problem_sets(demo: ml_collections.ConfigDict) -> dict[str, list[Problem]]:
  """The held-out, SFT and RL problems (disjoint, in that order of precedence)."""
  heldout = make_problems(demo.eval.num_problems, seed=demo.seed + 1)
  sft = make_problems(demo.sft.num_examples, seed=demo.seed + 2, exclude=heldout)
  rl = make_problems(demo.rl_steps * demo.rl.num_prompts, seed=demo.seed + 3, exclude=heldout + sft)
  return {"heldout": heldout, "sft": sft, "rl": rl}


def prepare(demo: ml_collections.ConfigDict) -> dict[str, Any]:
  """Writes the data step's files for the run folder `demo.workdir`; returns `data/summary.json`'s figures."""
  files = DemoFiles(Path(demo.workdir))
  tokenizer = build_tokenizer()
  save_tokenizer(tokenizer, files.tokenizer)
  multiturn = MultiTurnConfig.from_config(demo.rollout)
  record_rollout_contract(files.workdir, files.tokenizer, multiturn, tools_in_prompt=False, prompt_style="raw")

  problems = problem_sets(demo)
  _write_jsonl(files.heldout, problem_rows(problems["heldout"], "demo"))
  _write_jsonl(files.rl_problems, problem_rows(problems["rl"], "demo_rl"))

  teacher = TeacherConfig(**demo.teacher.to_dict())
  trajectories = asyncio.run(
    teacher_rollouts(tokenizer, problems["sft"], default_registry(), multiturn, teacher, demo.seed)
  )
  _write_jsonl(files.sft_data, ({"input_ids": r.ids, "loss_mask": r.loss_mask} for r in trajectories))
  reward = get_reward("retool")
  correct = [reward(r.text, p.answer).correct for r, p in zip(trajectories, problems["sft"])]
  summary = {
    "sft_examples": len(trajectories),
    "rl_problems": len(problems["rl"]),
    "heldout_problems": len(problems["heldout"]),
    "teacher_accuracy": float(np.mean(correct)),
    "teacher_tool_use": float(np.mean([r.tool_calls > 0 for r in trajectories])),
  }
  files.data_summary.write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  summary = prepare(demo_config(flags.FLAGS.workdir))
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", demo_config().workdir, "The demo's run folder.")
  app.run(main)
