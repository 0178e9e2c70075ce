"""The demo task: its tokenizer keeps the Qwen3 chat format; the teacher's SFT data is really executed."""

import asyncio

import numpy as np
import pytest

from retool_jax import rewards
from retool_jax.chat import SpecialIds, load_tokenizer, render_ids
from retool_jax.demo_task.task import Problem, answer_turn, code_turn, make_problems, prompt_ids
from retool_jax.demo_task.teacher import TeacherConfig, TeacherEngine, estimate, slip, teacher_rollouts
from retool_jax.demo_task.tokenizer import build_tokenizer, save_tokenizer
from retool_jax.rollout import GenerateRequest, MultiTurnConfig, SamplingParams

MULTITURN = MultiTurnConfig(
  max_context=192, max_turns=4, max_new_tokens=64, call_formats=("code",), enable_thinking=False
)


@pytest.fixture(scope="module")
def tokenizer():
  return build_tokenizer()


def test_tokenizer_round_trips_and_keeps_qwen_markers(tokenizer):
  text = code_turn(Problem(4821, 937)) + "\n\n<interpreter>\n4517277\n</interpreter>\n\n" + answer_turn("4517277")
  ids = tokenizer.encode(text, add_special_tokens=False)
  assert tokenizer.decode(ids) == text
  tokens = tokenizer.convert_ids_to_tokens(ids)
  for tag in ("<code>", "</code>", "<interpreter>", "</interpreter>", "<answer>", "\\boxed{", "<|im_end|>"):
    assert tag in tokens
  special = SpecialIds.from_tokenizer(tokenizer)  # every Qwen3 marker is a single token
  assert tokenizer.eos_token_id == special.im_end
  assert len(set(special.__dict__.values())) == len(special.__dict__)
  assert len(tokenizer) < 128


def test_chat_template_renders_like_qwen3(tokenizer):
  qwen = load_tokenizer(__import__("retool_jax.assets", fromlist=["x"]).QWEN3_TOKENIZER_DIR)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 12 * 34."}]
  for thinking in (True, False):
    ours = tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    theirs = qwen.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    assert ours == theirs
  ids = render_ids(tokenizer, messages[1:], add_generation_prompt=True, enable_thinking=False)
  assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tokenizer_saves_and_loads(tokenizer, tmp_path):
  save_tokenizer(tokenizer, tmp_path / "tok")
  loaded = load_tokenizer(tmp_path / "tok")
  p = make_problems(1, seed=0)[0]
  assert prompt_ids(loaded, p) == prompt_ids(tokenizer, p)
  assert loaded.eos_token_id == tokenizer.eos_token_id


def test_problems_are_distinct_and_respect_exclusions():
  held = make_problems(50, seed=1)
  train = make_problems(500, seed=2, exclude=held)
  assert len(set(train)) == 500 and not set(train) & set(held)
  assert make_problems(50, seed=1) == held
  p = Problem(4821, 937)
  assert p.answer == "4517277" and p.question == "Compute 4821 * 937."
  with pytest.raises(ValueError, match="n >= 1"):
    make_problems(0, seed=0)


def test_slip_changes_exactly_one_digit_and_estimate_is_wrong():
  rng = np.random.default_rng(0)
  for _ in range(200):
    s = slip("4517277", rng)
    assert len(s) == 7 and s[0] != "0" and sum(a != b for a, b in zip(s, "4517277")) == 1
  assert estimate(Problem(4821, 937)) == str(4800 * 937)
  with pytest.raises(ValueError, match="tool_rate"):
    TeacherConfig(tool_rate=1.5)


def test_teacher_trajectories_are_executed_in_the_sandbox(tokenizer):
  from retool_jax.tools import default_registry

  problems = make_problems(40, seed=3)
  config = TeacherConfig(tool_rate=0.5, slip_rate=0.0)
  rollouts = asyncio.run(teacher_rollouts(tokenizer, problems, default_registry(), MULTITURN, config, seed=0))
  engine = TeacherEngine(tokenizer, problems, config, seed=0)  # the same per-problem choices
  reward = rewards.get_reward("retool")
  for r, p, uses_tool in zip(rollouts, problems, engine.uses_tool):
    assert r.status == "completed" and r.ids[: r.num_prompt_tokens] == prompt_ids(tokenizer, p)
    assert len(r.ids) == len(r.loss_mask) == len(r.logprobs) <= MULTITURN.max_context
    result = reward(r.text, p.answer, {"num_tool_calls": r.tool_calls})
    assert result.format_ok
    if uses_tool:
      # the interpreter's real output is in the observation (mask 0), and the teacher copied it
      assert r.tool_calls == 1 and f"<interpreter>\n{p.answer}\n" in r.text and result.correct
      obs = [i for i, (m, j) in enumerate(zip(r.loss_mask, r.ids)) if i >= r.num_prompt_tokens and m == 0]
      assert p.answer in tokenizer.decode([r.ids[i] for i in obs])
    else:
      assert r.tool_calls == 0 and not result.correct
  assert 0 < sum(engine.uses_tool) < len(problems)


def test_teacher_slips_make_wrong_copies(tokenizer):
  from retool_jax.tools import default_registry

  problems = make_problems(12, seed=4)
  rollouts = asyncio.run(
    teacher_rollouts(
      tokenizer, problems, default_registry(), MULTITURN, TeacherConfig(tool_rate=1.0, slip_rate=1.0), seed=0
    )
  )
  reward = rewards.get_reward("retool")
  for r, p in zip(rollouts, problems):
    result = reward(r.text, p.answer, {"num_tool_calls": r.tool_calls})
    assert r.tool_calls == 1 and not result.correct and result.format_ok
    assert result.reward == pytest.approx(-0.9)  # the ReTool shaping for a wrong answer after one call
  # the slipped digit depends on the trajectory only, not on the order the sandbox returns results in
  engine = TeacherEngine(tokenizer, problems, TeacherConfig(tool_rate=1.0, slip_rate=1.0), seed=0)
  requests = [
    GenerateRequest(
      tuple(tokenizer.encode(f"<interpreter>\n{p.answer}\n</interpreter>")), SamplingParams(), f"{i}-1"
    )
    for i, p in enumerate(problems)
  ]
  forward = asyncio.run(engine.generate(requests))
  backward = asyncio.run(engine.generate(requests[::-1]))[::-1]
  assert [r.output_ids for r in forward] == [r.output_ids for r in backward]
  assert all(tokenizer.decode(r.output_ids) != answer_turn(p.answer) for r, p in zip(forward, problems))
