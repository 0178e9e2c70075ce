"""Shaped rewards, the format reward, the registry and batch summaries."""

import re
import uuid

import pytest

from retool_jax.rewards import (
  FormatReward,
  MathReward,
  RewardResult,
  TrajectoryInfo,
  available_rewards,
  combine_rewards,
  get_reward,
  register_reward,
  score_batch,
  summarize,
)

RETOOL_CORRECT = (
  "Let me compute.\n<code>\n```python\nprint(45)\n```\n</code>\n<interpreter>\n45\n</interpreter>\n"
  "<answer>\n\\boxed{45}\n</answer>"
)
RETOOL_WRONG = RETOOL_CORRECT.replace("\\boxed{45}", "\\boxed{44}")


@pytest.mark.parametrize("calls", range(13))
def test_retool_shaping_scores_wrong_answers_by_tool_calls(calls):
  reward = get_reward("retool")
  wrong = reward(RETOOL_WRONG, "045", TrajectoryInfo(num_tool_calls=calls))
  assert wrong.reward == pytest.approx(min(-0.6, -1 + 0.1 * calls))
  assert wrong.correct is False and wrong.extracted == "44"
  right = reward(RETOOL_CORRECT, "045", TrajectoryInfo(num_tool_calls=calls))
  assert right.reward == 1.0 and right.correct is True


def test_math_reward_without_shaping_ignores_tool_calls():
  reward = get_reward("math")
  assert reward(RETOOL_WRONG, "45", {"num_tool_calls": 8}).reward == -1.0
  assert reward(RETOOL_CORRECT, "45", {"num_tool_calls": 8}).reward == 1.0
  missing = reward("I give up.", "45")
  assert (missing.reward, missing.correct, missing.extracted) == (-1.0, False, None)
  assert missing.format_ok is False


def test_math_reward_options():
  strict = get_reward("math", mode="strict", correct_reward=1.0, wrong_reward=0.0)
  lenient = get_reward("math", wrong_reward=0.0)
  assert strict("\\boxed{0.5}", "\\frac{1}{2}").reward == 0.0
  assert lenient("\\boxed{0.5}", "\\frac{1}{2}").reward == 1.0
  with pytest.raises(ValueError, match="mode must be one of"):
    MathReward(mode="fuzzy")
  with pytest.raises(ValueError, match="answer_format must be one of"):
    FormatReward(answer_format="xml")


def test_format_reward():
  retool_format = get_reward("format")
  assert retool_format(RETOOL_CORRECT, "45").reward == 1.0
  # Well formed but wrong is still well formed; correctness is reported on its own.
  wrong = retool_format(RETOOL_WRONG, "45")
  assert (wrong.reward, wrong.correct, wrong.format_ok) == (1.0, False, True)
  assert retool_format(RETOOL_CORRECT, "45", {"truncated": True}).reward == 0.0
  assert retool_format(RETOOL_CORRECT, "45", {"finish_reason": "length"}).reward == 0.0
  assert retool_format(RETOOL_CORRECT, "45", {"finish_reason": "stop"}).reward == 1.0
  assert retool_format("<code>\nprint(1)\n<answer>\\boxed{45}</answer>", "45").reward == 0.0
  assert retool_format("So \\boxed{45}.", "45").reward == 0.0
  assert get_reward("format", answer_format="boxed")("So \\boxed{45}.", "45").reward == 1.0
  assert get_reward("format", answer_format="dapo")("work\nAnswer: 45", "45").reward == 1.0
  assert get_reward("format", answer_format="any", bad_reward=-1.0)("no answer", "45").reward == -1.0


def test_accuracy_is_verified_correctness_not_shaped_reward():
  reward = get_reward("retool")
  results = score_batch(
    reward,
    [RETOOL_CORRECT, RETOOL_WRONG, RETOOL_WRONG, "no answer"],
    ["45"] * 4,
    [{"num_tool_calls": 1}, {"num_tool_calls": 9}, {"num_tool_calls": 4}, None],
  )
  summary = summarize(results)
  assert summary["accuracy"] == 0.25
  assert summary["reward"] == pytest.approx((1.0 - 0.6 - 0.6 - 1.0) / 4)
  assert summary["answer_found"] == 0.75
  assert summary["num_tool_calls"] == pytest.approx(14 / 4)
  assert summary["verify_timeout"] == 0.0


def test_score_batch_with_threads_matches_sequential():
  reward = get_reward("math")
  responses = [f"\\boxed{{{i / 4}}}" for i in range(12)]
  golds = [f"\\frac{{{i}}}{{4}}" for i in range(12)]
  assert score_batch(reward, responses, golds, num_threads=3) == score_batch(reward, responses, golds)
  with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
    score_batch(reward, ["a", "b"], ["a"])


def test_combined_reward_sums_weighted_parts_and_keeps_primary_correctness():
  combined = get_reward({"retool": 1.0, "format": 0.5})
  result = combined(RETOOL_WRONG, "45", {"num_tool_calls": 2})
  assert result.reward == pytest.approx(-0.8 + 0.5 * 1.0)
  assert result.correct is False and result.extracted == "44"
  assert result.metrics["reward/retool"] == pytest.approx(-0.8)
  assert result.metrics["reward/format"] == 1.0
  as_pairs = combine_rewards([("retool", 1.0), (get_reward("format"), 0.5)])
  assert as_pairs(RETOOL_WRONG, "45", {"num_tool_calls": 2}).reward == pytest.approx(result.reward)
  with pytest.raises(ValueError, match="at least one"):
    combine_rewards({})
  as_text = get_reward("retool + 0.5 * format")  # the one-string form a config field holds
  assert as_text(RETOOL_WRONG, "45", {"num_tool_calls": 2}).reward == pytest.approx(result.reward)
  assert get_reward(f"2 * {__name__}:length_penalty")(RETOOL_CORRECT, "45").reward == pytest.approx(
    -0.002 * len(RETOOL_CORRECT)
  )
  for bad in ("retool + ", "x * format", "retool +* format"):
    with pytest.raises(ValueError, match="cannot read the term"):
      get_reward(bad)


def length_penalty(response, ground_truth, info, scale=0.001):
  return -scale * len(response)


def full_result(response, ground_truth, info):
  return RewardResult(reward=float(info.num_tool_calls), correct=True, extracted="x", format_ok=True)


def test_plugin_rewards_by_module_path():
  penalty = get_reward(f"{__name__}:length_penalty", scale=0.01)
  result = penalty(RETOOL_CORRECT, "45")
  assert result.reward == pytest.approx(-0.01 * len(RETOOL_CORRECT))
  # A plug-in that returns a number still gets verified correctness.
  assert result.correct is True and result.extracted == "45"
  assert get_reward(f"{__name__}:length_penalty")(RETOOL_WRONG, "45").correct is False
  assert get_reward(f"{__name__}:full_result")("text", "1", {"num_tool_calls": 3}).reward == 3.0


def test_registry_errors_are_named():
  with pytest.raises(ValueError, match="unknown reward 'nope'.*'retool'"):
    get_reward("nope")
  with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
    get_reward("no_such_module_xyz:fn")
  with pytest.raises(ValueError, match="has no attribute 'missing'"):
    get_reward(f"{__name__}:missing")
  with pytest.raises(TypeError, match="returned str"):
    get_reward(lambda response, gold, info: "high")("\\boxed{1}", "1")
  with pytest.raises(ValueError, match=r"trajectory info: unknown field\(s\) \['tools'\]"):
    get_reward("math")("\\boxed{1}", "1", {"tools": 3})


def test_register_reward():
  name = f"strict_math_{uuid.uuid4().hex[:8]}"
  register_reward(name, lambda: MathReward(mode="strict"))
  assert name in available_rewards()
  assert get_reward(name)("\\boxed{0.5}", "\\frac{1}{2}").correct is False
  with pytest.raises(ValueError, match="already registered"):
    register_reward(name, MathReward)
  with pytest.raises(ValueError, match="may not be empty or contain"):
    register_reward("pkg:fn", MathReward)


# ---- truncation, options in reward strings ---------------------------------------------------------

TRUNCATED_WITH_EARLY_BOX = r"<answer>\boxed{300}</answer> is my guess; let me check again with more" + " work" * 50


def test_a_response_cut_by_the_length_limit_is_wrong_whatever_it_boxed_before():
  cut = {"finish_reason": "length", "num_tool_calls": 2}
  result = get_reward("retool")(TRUNCATED_WITH_EARLY_BOX, "300", cut)
  assert (result.correct, result.format_ok, result.extracted) == (False, False, "300")
  assert result.reward == pytest.approx(-0.8)  # the shaped wrong reward for 2 calls, never +1
  finished = get_reward("retool")(TRUNCATED_WITH_EARLY_BOX, "300", {"finish_reason": "stop", "num_tool_calls": 2})
  assert finished.correct and finished.reward == 1.0
  graded = get_reward("retool(grade_truncated=True)")(TRUNCATED_WITH_EARLY_BOX, "300", cut)
  assert graded.correct and graded.reward == 1.0


def test_reward_strings_carry_options_alone_and_in_weighted_sums():
  strict = get_reward("retool(strict=True)")
  assert isinstance(strict, MathReward) and strict.mode == "strict" and strict.tool_shaping
  assert get_reward("math(strict=False, wrong_reward=-0.5)") == MathReward(mode="lenient", wrong_reward=-0.5)
  combined = get_reward("retool(strict=True) + 0.5 * format(answer_format='boxed')")
  (name0, fn0, w0), (name1, fn1, w1) = combined.parts
  assert (name0, w0, fn0.mode) == ("retool(strict=True)", 1.0, "strict")
  assert (w1, fn1.answer_format) == (0.5, "boxed")
  # strict does not evaluate: 1/2 is not 0.5 there, and is lenient
  answer = r"<answer>\boxed{\frac{1}{2}}</answer>"
  assert not strict(answer, "0.5").correct and get_reward("retool")(answer, "0.5").correct


@pytest.mark.parametrize(
  "spec, needle",
  [
    ("retool(strict=1)", "strict must be True or False"),
    ("retool(strict=True, mode='strict')", "not both"),
    ("retool(True)", "by name"),
    ("retool(strict=yes)", "'strict' must be a literal"),
    ("retool(strict=True", "write 'name' or"),
    ("retool(bogus=1)", "bogus"),
  ],
)
def test_bad_reward_options_are_named(spec, needle):
  with pytest.raises(ValueError, match=re.escape(needle)):
    get_reward(spec)
