"""Final-answer extraction and strict normalisation."""

import pytest

from retool_jax.rewards import extract_answer, last_boxed, normalize_answer
from retool_jax.rewards.extract import tags_balanced


@pytest.mark.parametrize(
  "text, expected",
  [
    (r"so $\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"first \boxed{3}, then \boxed{4}", "4"),
    (r"\boxed{3} and then \boxed{\frac{1}{2", None),  # the last box is unfinished: no answer, no fallback
    (r"so \boxed 5 it is", "5"),
    (r"\fbox{7}", "7"),
    (r"\boxed{ 12 }", "12"),
    ("no answer here", None),
  ],
)
def test_last_boxed(text, expected):
  assert last_boxed(text) == expected


def test_answer_tag_with_boxed_is_the_retool_form():
  found = extract_answer("think...\n<answer>\n\\boxed{\\dfrac{3}{4}}\n</answer>")
  assert (found.answer, found.source, found.boxed) == (r"\dfrac{3}{4}", "answer_tag", True)


def test_unclosed_answer_tag_runs_to_the_end():
  # Engines that stop on "</answer>" usually drop the stop string.
  found = extract_answer("reasoning\n<answer>\n\\boxed{116}\n")
  assert (found.answer, found.source) == ("116", "answer_tag")


def test_answer_tag_without_boxed():
  found = extract_answer("<answer> $42$ </answer>")
  assert (found.answer, found.source, found.boxed) == ("42", "answer_tag", False)


@pytest.mark.parametrize(
  "text, expected",
  [
    ("work\nAnswer: 42", "42"),
    ("work\nAnswer: $\\frac{1}{2}$.", r"\frac{1}{2}"),
    ("work\n**Final Answer:** 7.", "7"),
    ("work\nanswer:\\boxed{34}", "34"),  # the DAPO-Math prompt's "Answer: \boxed{$Answer}"
  ],
)
def test_answer_line(text, expected):
  found = extract_answer(text)
  assert (found.answer, found.source) == (expected, "answer_line")


def test_answer_word_inside_prose_is_not_an_answer_line():
  assert extract_answer("I will check my answer: it seems fine.") is None


def test_the_form_that_starts_last_wins():
  assert extract_answer("\\boxed{4}\nOn reflection:\nAnswer: 5").answer == "5"
  assert extract_answer("Answer: 5\nWait, that is wrong. \\boxed{4}").answer == "4"
  assert extract_answer("<answer>1</answer> no, \\boxed{2}").answer == "2"


def test_code_and_tool_output_are_not_the_models_answer():
  response = (
    "Let me compute.\n<code>\n```python\nprint('\\\\boxed{13}')\n```\n</code>\n"
    "<interpreter>\nAnswer: 99\n\\boxed{13}\n</interpreter>\nSo the result is \\boxed{12}."
  )
  assert extract_answer(response).answer == "12"
  truncated_in_output = "Answer: 3 is a guess.\n<interpreter>\nAnswer: 99\n"
  assert extract_answer(truncated_in_output).answer == "3 is a guess"


def test_nothing_to_extract():
  assert extract_answer("") is None
  assert extract_answer("The answer is 42.") is None
  assert extract_answer("\\boxed{}") is None


def test_non_string_response_is_rejected():
  with pytest.raises(TypeError, match="response must be a str"):
    extract_answer(["\\boxed{1}"])


@pytest.mark.parametrize(
  "text, balanced",
  [
    ("<code>x</code><interpreter>1</interpreter><answer>\\boxed{1}</answer>", True),
    ("<code>x</code><interpreter>1</interpreter><answer>\\boxed{1}", True),
    ("<code>x<interpreter>1</interpreter><answer>\\boxed{1}</answer>", False),
    ("<answer>1</answer></answer>", False),
    ("</answer><answer>", False),
  ],
)
def test_tags_balanced(text, balanced):
  assert tags_balanced(text) is balanced


@pytest.mark.parametrize(
  "raw, normalized",
  [
    ("025", "25"),
    ("25.0", "25"),
    (".5", "0.5"),
    ("-0", "0"),
    ("1,000", "1000"),
    (r"11,\! 111,\! 111,\! 100", "11111111100"),
    (r"\$32,\!348", "32348"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\frac12", r"\frac{1}{2}"),
    (r"\frac 59", r"\frac{5}{9}"),
    (r"\frac9{19}", r"\frac{9}{19}"),
    (r"11\sqrt2", r"11\sqrt{2}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"90^\circ", "90"),
    (r"10\%", "10"),
    (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"),
    (r"864 \mbox{ inches}^2", "864"),
    (r"5.4 \text{ cents}", "5.4"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"\text{(C)}", "C"),
    ("y = 2x + 3", "2x+3"),
    ("$6 - 5i$", "6-5i"),
    (r"\begin{pmatrix} -1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}-1\\2\end{pmatrix}"),
  ],
)
def test_normalize_answer(raw, normalized):
  assert normalize_answer(raw) == normalized


# ---- the last answer started is the final one ------------------------------------------------------


@pytest.mark.parametrize(
  "text",
  [
    r"Earlier: \boxed{300}. Final: \boxed{\frac{1}{2}",  # unfinished last box
    r"Earlier: \boxed{300}. On second thought: \boxed{}",  # erased answer
    r"Earlier: \boxed{300}. <answer>\boxed{</answer>",
    r"Earlier: \boxed{300}. <answer></answer>",
  ],
)
def test_an_unfinished_or_empty_last_answer_is_no_answer(text):
  assert extract_answer(text) is None


def test_an_empty_answer_line_is_a_heading_not_an_erased_answer():
  found = extract_answer("Final answer:\n\\boxed{12}")
  assert (found.answer, found.source) == ("12", "boxed")


def test_prose_naming_the_tool_call_tag_keeps_the_answer_after_it():
  text = r"Use <tool_call> tags to call tools. The answer is \boxed{4}."
  assert extract_answer(text).answer == "4"
  assert tags_balanced(text)
  call = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'
  assert extract_answer(r"I write a <tool_call> block. " + call + r" so \boxed{5}").answer == "5"
  assert extract_answer(call + r" \boxed{5} <tool_call>" + "\n" + r'{"x": "\boxed{6}"}').answer == "5"


def test_unicode_minus_is_minus_in_strict_normalisation():
  assert normalize_answer("−300") == normalize_answer("-300") == "-300"
  assert normalize_answer("\\frac{−1}{2}") == "\\frac{-1}{2}"
