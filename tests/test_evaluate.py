"""Evaluation: pass@k by hand, call statistics of hand-made rollouts, a scripted-engine run with real tools, the CLI."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retool_jax import evaluate as ev
from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import load_tokenizer
from retool_jax.rollout import FinishReason, GenerateResult, Rollout, TurnStats

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(QWEN3_TOKENIZER_DIR)


# ---- pass@k ----------------------------------------------------------------------------------------


def test_pass_at_k_matches_the_formula_by_hand():
  # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
  assert ev.pass_at_k(5, 2, 2) == pytest.approx(0.7)
  # k=1 is the fraction correct
  assert ev.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
  # fewer wrong samples than k: some correct sample is always drawn
  assert ev.pass_at_k(4, 3, 2) == 1.0
  assert ev.pass_at_k(4, 0, 4) == 0.0
  # n=16, c=1, k=4: 1 - C(15,4)/C(16,4) = 4/16
  assert ev.pass_at_k(16, 1, 4) == pytest.approx(0.25)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
  with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
    ev.pass_at_k(n, c, k)


# ---- call statistics of hand-made rollouts ---------------------------------------------------------


def make_rollout(tokenizer, segments, observations, turns, status="completed"):
  """A rollout whose response alternates generated `segments` (mask 1) and `observations` (mask 0)."""
  prompt = tokenizer.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
  ids, mask = list(prompt), [0] * len(prompt)
  for i, text in enumerate(segments):
    part = tokenizer.encode(text, add_special_tokens=False)
    ids += part
    mask += [1] * len(part)
    if i < len(observations):
      obs = tokenizer.encode(observations[i], add_special_tokens=False)
      ids += obs
      mask += [0] * len(obs)
  text = tokenizer.decode(ids[len(prompt) :])
  return Rollout(ids, mask, [0.0] * len(ids), len(prompt), status, "eos", turns, text)


GOOD_CODE = "<code>\n```python\nprint(1 + 1)\n```\n</code>"
GOOD_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>'
BAD_CALL = "<tool_call>\n{not json}\n</tool_call>"


def test_call_stats_counts_parsable_executed_and_right_tool_calls(tokenizer):
  rollout = make_rollout(
    tokenizer,
    [GOOD_CODE + GOOD_CALL, BAD_CALL, "done " + GOOD_CODE],  # the last call is never executed (no observation)
    ["<interpreter>2</interpreter>", "\n<tool_response>error</tool_response>\n"],
    # turn 1: 2 calls, the calculator failed; turn 2: 1 unparsable call (an error the model reads)
    [TurnStats(10, "stop", tool_calls=2, tool_errors=1), TurnStats(5, "stop", tool_calls=1, tool_errors=1)],
    status="truncated",
  )
  stats = ev.call_stats(rollout, tokenizer, ("tool_call", "code"), expected_tool="code_interpreter")
  assert stats == {
    "calls": 4,  # every block written, executed or not
    "parsable_calls": 3,
    "executed_calls": 2,  # the unparsable block was answered with its error, not executed
    "successful_calls": 1,
    "right_tool_calls": 2,  # the two code blocks; the calculator call is the wrong tool
  }
  assert [executed for _, executed in ev.generated_segments(rollout)] == [True, True, False]


def test_call_stats_of_a_plain_answer_is_all_zero(tokenizer):
  rollout = make_rollout(tokenizer, ["<answer>\\boxed{2}</answer><|im_end|>"], [], [TurnStats(7, "stop")])
  assert set(ev.call_stats(rollout, tokenizer, ("tool_call", "code")).values()) == {0}


def record(problem, correct, **fields):
  base = dict(
    problem=problem,
    correct=correct,
    reward=1.0 if correct else -1.0,
    format_ok=correct,
    status="completed",
    response_tokens=10,
    tool_calls=0,
    calls=0,
    parsable_calls=0,
    executed_calls=0,
    successful_calls=0,
    right_tool_calls=0,
    expected_tool=None,
  )
  return base | fields


def test_summarize_pools_calls_and_averages_problems():
  records = [
    # problem 0: 3 of 4 correct; 4 blocks written, 3 parsable, 3 executed, 2 succeeded; the data names a tool
    record(
      0,
      True,
      tool_calls=2,
      calls=2,
      parsable_calls=2,
      executed_calls=2,
      successful_calls=2,
      right_tool_calls=1,
      expected_tool="code_interpreter",
    ),
    record(
      0,
      True,
      tool_calls=2,
      calls=2,
      parsable_calls=1,
      executed_calls=1,
      successful_calls=0,
      right_tool_calls=1,
      expected_tool="code_interpreter",
    ),
    record(0, True, expected_tool="code_interpreter"),
    record(0, False, status="truncated", response_tokens=50, expected_tool="code_interpreter"),
    # problem 1: none correct, no calls, no tool named (its parsable calls do not count for tool accuracy)
    record(1, False, tool_calls=1, calls=1, parsable_calls=1, executed_calls=1, successful_calls=1),
    record(1, False),
    record(1, False),
    record(1, False),
  ]
  s = ev.summarize(records, pass_k=(1, 2, 4, 8))
  assert s["problems"] == 2 and s["samples_per_problem"] == 4 and s["trajectories"] == 8
  assert s["avg@4"] == pytest.approx((3 / 4 + 0) / 2)
  assert s["pass@1"] == pytest.approx(s["avg@4"])
  assert s["pass@2"] == pytest.approx((1 - math.comb(1, 2) / math.comb(4, 2) + 0) / 2)  # (1 + 0) / 2
  assert s["pass@4"] == pytest.approx(0.5)
  assert "pass@8" not in s  # k > n cannot be estimated
  assert s["tool_calls_per_problem"] == pytest.approx(5 / 8)
  assert s["tool_use_rate"] == pytest.approx(3 / 8)
  assert s["format_correctness"] == pytest.approx(4 / 5)
  assert s["execution_success_rate"] == pytest.approx(3 / 4)
  assert s["tool_accuracy"] == pytest.approx(2 / 3)
  assert s["truncation_rate"] == pytest.approx(1 / 8)
  assert s["response_tokens_mean"] == pytest.approx((7 * 10 + 50) / 8)
  assert s["response_tokens_max"] == 50
  table = ev.markdown_table(s, "set")
  assert "| pass@2 | 0.5000 |" in table and "| metric | value |" in table


def test_summarize_reports_call_ratios_as_missing_without_calls():
  s = ev.summarize([record(0, True), record(0, False)], pass_k=(1,))
  assert s["format_correctness"] is None and s["execution_success_rate"] is None and s["tool_accuracy"] is None
  assert "| format_correctness | n/a |" in ev.markdown_table(s)


def test_summarize_rejects_uneven_samples():
  with pytest.raises(ValueError, match="different numbers of samples"):
    ev.summarize([record(0, True), record(0, True), record(1, False)])


# ---- a whole evaluation with a scripted engine and the real sandbox ---------------------------------


class ScriptedEngine:
  """Answers by trajectory index and turn: tool calls (one good, one failing, one malformed), then answers."""

  SCRIPTS = [
    ["<code>\n```python\nprint((16 - 3 - 4) * 2)\n```\n</code>", "<answer>\\boxed{18}</answer>"],
    ["<code>\n```python\nprint(1 / 0)\n```\n</code>", "<answer>\\boxed{17}</answer>"],
    ["<tool_call>\n{not json}\n</tool_call>", "<answer>\\boxed{18}</answer>"],
    ["<answer>\\boxed{4}</answer>"],
    ["<answer>\\boxed{4}</answer>"],
    ["<answer>\\boxed{4}</answer>"],
  ]

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

  async def generate(self, requests):
    out = []
    for r in requests:
      index, turn = (int(x) for x in r.request_id.split("-"))
      text = self.SCRIPTS[index][turn]
      ids = self.tokenizer.encode(text, add_special_tokens=False)
      if text.endswith("</code>"):
        matched = "</code>"
      elif text.endswith("</tool_call>"):
        matched = ids[-1]
      else:
        ids.append(self.im_end)
        matched = self.im_end
      out.append(GenerateResult(ids, [0.0] * len(ids), FinishReason("stop", matched=matched), 0))
    return out

  async def update_weights(self, params, version):
    raise TypeError("scripted")

  async def health(self):
    return True


def test_evaluate_with_a_scripted_engine_writes_trajectories_and_summary(tmp_path, tokenizer, fixtures_dir):
  c = ev.default_config()
  c.workdir = str(tmp_path / "eval")
  c.data.path = str(fixtures_dir / "gsm8k" / "test.jsonl")  # answers 18 and 3
  c.data.limit = 2
  c.eval.num_samples = 3
  c.eval.pass_k = (1, 2, 3)
  c.rollout.max_context = 4096
  summary = ev.evaluate(c, engine=ScriptedEngine(tokenizer))

  assert summary["avg@3"] == pytest.approx((2 / 3 + 0) / 2)
  assert summary["pass@2"] == pytest.approx(0.5)  # problem 0: one wrong sample of 3, never two
  assert summary["tool_calls_per_problem"] == pytest.approx(3 / 6)
  assert summary["format_correctness"] == pytest.approx(2 / 3)  # the malformed block
  assert summary["execution_success_rate"] == pytest.approx(1 / 2)  # 1 / 0 raised in the sandbox
  assert summary["tool_accuracy"] is None  # GSM8K names no tool
  assert summary["truncation_rate"] == 0.0

  lines = [json.loads(x) for x in (tmp_path / "eval" / "trajectories.jsonl").read_text().splitlines()]
  assert [(r["problem"], r["sample"]) for r in lines] == [(p, s) for p in range(2) for s in range(3)]
  assert [r["correct"] for r in lines] == [True, False, True, False, False, False]
  assert lines[0]["ground_truth"] == "18" and "Janet" in lines[0]["question"]
  assert "<interpreter>" in lines[0]["response"] and "18" in lines[0]["response"]
  assert "ZeroDivisionError" in lines[1]["response"]
  assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == summary
  assert "| avg@3 | 0.3333 |" in (tmp_path / "eval" / "summary.md").read_text()


class EquivalentFormsEngine(ScriptedEngine):
  """Two answers to 18: one a fraction that only the lenient verifier reads as 18."""

  SCRIPTS = [["<answer>\\boxed{\\frac{36}{2}}</answer>"], ["<answer>\\boxed{18}</answer>"]]


@pytest.mark.parametrize("reward, avg", [("retool", 1.0), ("retool(strict=True)", 0.5)])
def test_summary_shows_strict_and_lenient_accuracy_whatever_the_reward(
  tmp_path, tokenizer, fixtures_dir, reward, avg
):
  c = ev.default_config()
  c.workdir = str(tmp_path / "eval")
  c.data.path = str(fixtures_dir / "gsm8k" / "test.jsonl")  # the first answer is 18
  c.data.limit = 1
  c.eval.num_samples = 2
  c.eval.pass_k = (1,)
  c.rollout.max_context = 4096
  c.reward = reward
  summary = ev.evaluate(c, engine=EquivalentFormsEngine(tokenizer))
  assert (summary["avg@2"], summary["accuracy_strict"], summary["accuracy_lenient"]) == (avg, 0.5, 1.0)
  lines = [json.loads(x) for x in (tmp_path / "eval" / "trajectories.jsonl").read_text().splitlines()]
  assert [(r["correct_strict"], r["correct_lenient"]) for r in lines] == [(False, True), (True, True)]


def test_tools_can_run_without_their_schemas_in_the_prompt(tmp_path, tokenizer, fixtures_dir):
  engine = ScriptedEngine(tokenizer)
  seen = []
  generate = engine.generate

  async def record(requests):
    seen.extend(tokenizer.decode(r.prompt_ids) for r in requests)
    return await generate(requests)

  engine.generate = record
  c = ev.default_config()
  c.workdir = str(tmp_path / "eval")
  c.data.path = str(fixtures_dir / "gsm8k" / "test.jsonl")
  c.data.limit = 1
  c.eval.num_samples = 1
  c.eval.pass_k = (1,)
  c.rollout.max_context = 4096
  c.tools_in_prompt = False
  summary = ev.evaluate(c, engine=engine)
  assert summary["avg@1"] == 1.0 and summary["execution_success_rate"] == 1.0  # the interpreter still ran
  assert "<tools>" not in seen[0] and seen[0].startswith("<|im_start|>user\n")
  assert "<interpreter>\n18" in seen[1]  # the second turn continues after the tool's output


def test_config_errors_name_the_field(tmp_path):
  c = ev.default_config()
  with pytest.raises(ValueError, match="config.data.path is empty"):
    ev.check_config(c)
  c.data.path = "x.jsonl"
  c.eval.pass_k = (1, 8)
  with pytest.raises(ValueError, match=r"eval.pass_k has \[8\]"):
    ev.check_config(c)


# ---- the CLI on a random tiny model -----------------------------------------------------------------


@pytest.mark.slow
def test_cli_on_a_tiny_random_model_writes_the_files(tmp_path, fixtures_dir):
  workdir = tmp_path / "tiny"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "retool_jax.evaluate",
      "--config=configs/eval_aime.py:tiny",
      f"--config.workdir={workdir}",
      f"--config.data.path={fixtures_dir / 'math500' / 'test.jsonl'}",
      "--config.rollout.max_turns=1",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["problems"] == 2 and summary["samples_per_problem"] == 2
  assert 0.0 <= summary["pass@2"] <= 1.0 and summary["response_tokens_max"] <= 8
  lines = (workdir / "trajectories.jsonl").read_text().splitlines()
  assert len(lines) == 4
  assert "| pass@2 |" in proc.stdout


@pytest.mark.parametrize("variant", ["rl", "sft"])
def test_demo_eval_config_checks(variant):
  path = Path(__file__).resolve().parents[1] / "configs" / "eval_demo.py"
  spec = importlib.util.spec_from_file_location("eval_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant)
  ev.check_config(c)
  assert c.model.checkpoint.endswith(f"{variant}/checkpoints") and not c.tools_in_prompt
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("ppo")
