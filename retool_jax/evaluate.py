"""`python -m retool_jax.evaluate --config=configs/eval_aime.py`: accuracy and tool use of a policy on a math set.

Samples `eval.num_samples` multi-turn tool rollouts per problem with the embedded JAX engine (a checkpoint, or a
random model for smoke tests) or an SGLang server (`engine.sglang_url`), scores them with the configured reward
(accuracy is always the verified `correct`, never the shaped reward) and writes to `workdir`:

* `trajectories.jsonl` - one line per rollout: problem, answer, response, correctness, tool and length stats;
* `summary.json` / `summary.md` - avg@n, pass@k (unbiased estimator), accuracy under the strict and the lenient
  verifier (avg@n uses the reward's own), tool calls per problem, execution success,
  format correctness, tool accuracy, response length and truncation rate.

Prompts are rendered as the checkpoint's prompt contract (`prompt_contract.json` of its run or export folder)
says: tokenizer, prompt style, system prompt, tool schemas in the prompt or not, call and observation formats,
thinking. A config field set explicitly (or a `rollout` field given) wins over the contract.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from retool_jax import sharding as sharding_lib
from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import load_tokenizer, render_ids
from retool_jax.chat.parse import ToolCall, parse_tool_calls
from retool_jax.chat.prompt_contract import ContractError, PromptContract, check_tokenizer_fits, find_contract
from retool_jax.data import load_math
from retool_jax.rewards import get_reward
from retool_jax.rewards.math_rewards import grade
from retool_jax.rollout import JaxEngine, MultiTurnConfig, SGLangEngine
from retool_jax.rollout.multiturn import TOOL_MODES, tools_for
from retool_jax.rollout.scoring import reward_info, rollout_and_score
from retool_jax.train import build, validate_config

FREE_FORM = ("rollout", "model.overrides")  # checked by MultiTurnConfig / Qwen3Config


def default_config() -> ml_collections.ConfigDict:
  """Every field an evaluation reads, with its default."""
  c = ml_collections.ConfigDict()
  c.workdir = "runs/eval"  # trajectories.jsonl, summary.json, summary.md
  c.seed = 0
  c.model = build.model_fields()  # checkpoint (Orbax or HF folder) / preset / overrides / dtypes
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # a math problem file any `load_math` schema reads (AIME, MATH-500, GSM8K, DAPO)
  c.data.prompt_style = ""  # raw | problem | retool (retool_jax.data.prompts); "" = the contract's, else retool
  c.data.limit = 0  # 0 = every problem
  c.data.tokenizer = ""  # "" = the checkpoint's prompt contract, else the packaged Qwen3 tokenizer
  c.engine = ml_collections.ConfigDict()
  c.engine.sglang_url = ""  # "" = the embedded JAX engine
  c.engine.max_batch_size = 64
  c.engine.decode_chunk = 32
  c.reward = "retool"  # a registered reward name or "module:function"
  # interpreter: a sandboxed session per trajectory | interpreter_stateless: every call in a fresh sandboxed
  # interpreter (no session start-up per trajectory) | none: plain generation, no tools shown or run
  c.tools = "interpreter"
  # False: tools run, but their schemas stay out of the system prompt (prompts that describe the interpreter in
  # words, as models trained on such prompts expect). None: the checkpoint's prompt contract, else True.
  c.tools_in_prompt = ml_collections.config_dict.placeholder(bool)
  c.system_prompt = ml_collections.config_dict.placeholder(str)  # None: the contract's (else none); "": none
  c.rollout = ml_collections.ConfigDict(dict(temperature=1.0, top_p=1.0))  # MultiTurnConfig fields
  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 4  # responses per problem (n of avg@n)
  c.eval.pass_k = (1, 4)  # pass@k reported for each k <= num_samples
  return c


# ---- metrics ---------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of a problem with `c` correct among `n` samples: 1 - C(n-c, k) / C(n, k)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def generated_segments(rollout: Any) -> list[tuple[list[int], bool]]:
  """The response's runs of generated tokens, each with whether an observation (tool results) followed it."""
  mask = rollout.loss_mask[rollout.num_prompt_tokens :]
  ids = rollout.ids[rollout.num_prompt_tokens :]
  runs: list[tuple[list[int], bool]] = []
  start = None
  for i, bit in enumerate([*mask, 0]):
    if bit and start is None:
      start = i
    elif not bit and start is not None:
      runs.append((ids[start:i], i < len(mask)))
      start = None
  return runs


def call_stats(
  rollout: Any, tokenizer: Any, formats: Sequence[str], expected_tool: str | None = None
) -> dict[str, int]:
  """Counts of the calls one rollout wrote: all blocks, parsable ones, executed ones and their outcomes.

  A call is parsable when its block is well-formed (whatever tool it names); an executed call succeeded unless
  its tool (or an unknown tool name) reported an error. `right_tool` counts parsable calls of `expected_tool`.
  """
  blocks = parsable = executed_unparsable = right_tool = 0
  for ids, executed in generated_segments(rollout):
    items = parse_tool_calls(tokenizer.decode(ids), None, formats=tuple(formats)).items
    calls = [item for item in items if isinstance(item, ToolCall)]
    blocks += len(items)
    parsable += len(calls)
    right_tool += sum(call.name == expected_tool for call in calls) if expected_tool else 0
    executed_unparsable += (len(items) - len(calls)) if executed else 0
  executed_calls = rollout.tool_calls - executed_unparsable
  return {
    "calls": blocks,
    "parsable_calls": parsable,
    "executed_calls": executed_calls,
    "successful_calls": rollout.tool_calls - rollout.tool_errors,
    "right_tool_calls": right_tool,
  }


def verdicts(rollout: Any, ground_truth: str) -> dict[str, bool]:
  """The response's correctness under both verifiers (`correct_strict`, `correct_lenient`), whatever the reward."""
  info = reward_info(rollout)
  return {
    f"correct_{mode}": bool(grade(rollout.text, ground_truth, info, mode=mode).verdict.correct)
    for mode in ("strict", "lenient")
  }


def trajectory_record(
  problem: int, sample: int, example: Any, rollout: Any, result: Any, calls: Mapping[str, int]
) -> dict[str, Any]:
  """One line of `trajectories.jsonl`."""
  return {
    "problem": problem,
    "sample": sample,
    "id": example.metadata.get("unique_id", example.metadata.get("id", problem)),
    "question": example.metadata.get("problem", ""),
    "ground_truth": example.ground_truth,
    "expected_tool": example.metadata.get("expected_tool"),
    "response": rollout.text,
    "extracted": getattr(result, "extracted", None),
    "correct": bool(result.correct),
    "reward": float(result.reward),
    "format_ok": bool(result.format_ok),
    **verdicts(rollout, example.ground_truth),
    "status": rollout.status,
    "stop_reason": rollout.stop_reason,
    "response_tokens": int(sum(rollout.loss_mask)),
    "total_tokens": len(rollout.ids),
    "turns": len(rollout.turns),
    "tool_calls": rollout.tool_calls,
    "tool_errors": rollout.tool_errors,
    **calls,
  }


def _ratio(num: float, den: float) -> float | None:
  return float(num) / float(den) if den else None


def summarize(records: Sequence[Mapping[str, Any]], pass_k: Sequence[int] = (1,)) -> dict[str, Any]:
  """Summary metrics of trajectory records (`trajectory_record`); every problem must have the same n samples.

  Ratios over calls are pooled over all calls (None when there were none); per-problem figures are means over
  problems. Tool accuracy only counts problems whose data names the expected tool.
  """
  if not records:
    raise ValueError("no trajectories to summarize")
  by_problem: dict[int, list[Mapping[str, Any]]] = {}
  for r in records:
    by_problem.setdefault(r["problem"], []).append(r)
  sizes = {len(v) for v in by_problem.values()}
  if len(sizes) != 1:
    raise ValueError(f"problems have different numbers of samples {sorted(sizes)}; pass@k needs the same n")
  (n,) = sizes
  correct = [sum(r["correct"] for r in group) for group in by_problem.values()]

  def total(key: str, rs: Sequence[Mapping[str, Any]] = records) -> float:
    return float(sum(r[key] for r in rs))

  named = [r for r in records if r.get("expected_tool")]
  summary: dict[str, Any] = {
    "problems": len(by_problem),
    "samples_per_problem": n,
    "trajectories": len(records),
    f"avg@{n}": float(np.mean([c / n for c in correct])),
  }
  for k in sorted(set(pass_k)):
    if k <= n:
      summary[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in correct]))
  for mode in ("strict", "lenient"):  # the reward's verifier decides avg@n; both are shown to see the gap
    if all(f"correct_{mode}" in r for r in records):
      summary[f"accuracy_{mode}"] = float(np.mean([r[f"correct_{mode}"] for r in records]))
  summary |= {
    "reward_mean": float(np.mean([r["reward"] for r in records])),
    "tool_calls_per_problem": total("tool_calls") / len(records),  # per attempt (one sample of a problem)
    "tool_use_rate": float(np.mean([r["tool_calls"] > 0 for r in records])),
    "execution_success_rate": _ratio(total("successful_calls"), total("executed_calls")),
    "format_correctness": _ratio(total("parsable_calls"), total("calls")),
    "tool_accuracy": _ratio(total("right_tool_calls", named), total("parsable_calls", named)),
    "answer_format_rate": float(np.mean([r["format_ok"] for r in records])),
    "response_tokens_mean": float(np.mean([r["response_tokens"] for r in records])),
    "response_tokens_max": int(max(r["response_tokens"] for r in records)),
    "truncation_rate": float(np.mean([r["status"] == "truncated" for r in records])),
    "abort_rate": float(np.mean([r["status"] == "aborted" for r in records])),
  }
  return summary


def markdown_table(summary: Mapping[str, Any], title: str = "") -> str:
  """The summary as a two-column Markdown table."""

  def fmt(v: Any) -> str:
    if v is None:
      return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)

  lines = [f"## {title}", ""] if title else []
  lines += ["| metric | value |", "|---|---|"]
  lines += [f"| {k} | {fmt(v)} |" for k, v in summary.items()]
  return "\n".join(lines) + "\n"


# ---- the run ---------------------------------------------------------------------------------------

CONTRACT_ROLLOUT_FIELDS = ("call_formats", "observation_format", "enable_thinking")


def prompt_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """How prompts are rendered: explicit config fields, else the checkpoint's prompt contract, else the defaults.

  Returns `tokenizer`, `prompt_style`, `tools_in_prompt`, `system_prompt`, `rollout` (the `MultiTurnConfig`
  fields) and `contract` (None when the checkpoint has none).
  """
  c = config
  contract = find_contract(c.model.checkpoint) if c.model.checkpoint else None
  recorded = contract or PromptContract(tokenizer=str(QWEN3_TOKENIZER_DIR), prompt_style="retool")
  rollout = {k: getattr(recorded, k) for k in CONTRACT_ROLLOUT_FIELDS} if contract is not None else {}
  return {
    "contract": contract,
    "tokenizer": c.data.tokenizer or str(recorded.tokenizer_path()),
    "prompt_style": c.data.prompt_style or recorded.prompt_style or "retool",
    "tools_in_prompt": recorded.tools_in_prompt if c.tools_in_prompt is None else c.tools_in_prompt,
    "system_prompt": recorded.system_prompt if c.system_prompt is None else (c.system_prompt or None),
    "rollout": {"seed": c.seed, **rollout, **c.rollout.to_dict()},
  }


def _engine(c: ml_collections.ConfigDict, tokenizer: Any, tokenizer_name: str, max_length: int) -> Any:
  if c.engine.sglang_url:
    return SGLangEngine(c.engine.sglang_url)
  model = build.build_model(c.model, sharding_lib.make_mesh(**c.mesh.to_dict()), c.seed)
  check_tokenizer_fits(
    tokenizer,
    model.config.vocab_size,
    tokenizer_name=tokenizer_name,
    model_name=c.model.checkpoint or "(randomly initialised from config.model)",
  )
  return JaxEngine(
    model,
    tokenizer=tokenizer,
    max_length=max_length,
    max_batch_size=c.engine.max_batch_size,
    decode_chunk=c.engine.decode_chunk,
    seed=c.seed,
  )


async def _rollouts(
  engine: Any, prompts: list[Any], answers: list[str], tools: Any, multiturn, reward_fn, tokenizer
):
  try:
    return await rollout_and_score(engine, prompts, answers, tools, multiturn, reward_fn, tokenizer)
  finally:
    close = getattr(engine, "close", None)
    if close is not None and asyncio.iscoroutinefunction(close):
      await close()


def evaluate(config: ml_collections.ConfigDict, engine: Any = None) -> dict[str, Any]:
  """Runs the evaluation `config` describes, writes the trajectories and summary to `workdir`; returns the summary.

  `engine` (any `retool_jax.rollout.Engine`) replaces the one the config would build.
  """

  check_config(config)
  c = config
  n = c.eval.num_samples
  prompt = prompt_settings(c)
  multiturn = MultiTurnConfig.from_config(prompt["rollout"])
  tokenizer = load_tokenizer(prompt["tokenizer"])
  examples = load_math(c.data.path, prompt_style=prompt["prompt_style"], limit=c.data.limit or None)
  reward_fn = get_reward(c.reward)
  tools = tools_for(c.tools)
  engine = engine if engine is not None else _engine(c, tokenizer, prompt["tokenizer"], multiturn.max_context)

  system = [{"role": "system", "content": prompt["system_prompt"]}] if prompt["system_prompt"] else []
  prompts = [_with_system(e.prompt, system) for e in examples for _ in range(n)]
  if not prompt["tools_in_prompt"]:
    prompts = [render_ids(tokenizer, p, enable_thinking=multiturn.enable_thinking) for p in prompts]
  answers = [e.ground_truth for e in examples for _ in range(n)]
  rollouts, results = asyncio.run(_rollouts(engine, prompts, answers, tools, multiturn, reward_fn, tokenizer))

  records = []
  for i, (rollout, result) in enumerate(zip(rollouts, results, strict=True)):
    example = examples[i // n]
    calls = call_stats(rollout, tokenizer, multiturn.call_formats, example.metadata.get("expected_tool"))
    records.append(trajectory_record(i // n, i % n, example, rollout, result, calls))
  summary = summarize(records, c.eval.pass_k)

  workdir = Path(c.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "trajectories.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  (workdir / "summary.md").write_text(markdown_table(summary, Path(c.data.path).name))
  return summary


def _with_system(messages: list[dict], system: list[dict]) -> list[dict]:
  if not system or (messages and messages[0].get("role") == "system"):
    return messages
  return system + list(messages)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails with the name of the first field that is unknown, mistyped or out of range."""
  validate_config(config, default_config(), free_form=FREE_FORM)
  if not config.data.path:
    raise ValueError("config.data.path is empty: evaluation needs problems with answers")
  if config.tools not in TOOL_MODES:
    raise ValueError(f"config.tools={config.tools!r}; expected one of {TOOL_MODES}")
  n = config.eval.num_samples
  if n < 1:
    raise ValueError(f"config.eval.num_samples={n} must be >= 1")
  bad_k = [k for k in config.eval.pass_k if not 1 <= k <= n]
  if bad_k:
    raise ValueError(f"config.eval.pass_k has {bad_k}; each k must be in [1, eval.num_samples={n}]")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  config = _CONFIG.value
  try:
    check_config(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  sharding_lib.initialize_distributed()
  try:
    summary = evaluate(config)
  except ContractError as e:
    raise app.UsageError(str(e)) from None
  print(markdown_table(summary, Path(config.data.path).name))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file (configs/eval_*.py).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
