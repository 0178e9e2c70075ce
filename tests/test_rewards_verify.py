"""Answer equivalence on the shared AIME / MATH-500 / GSM8K answers, strict and lenient, with a deadline."""

import json
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retool_jax.rewards import Verifier, is_correct, judge, verify

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)


def _rows(relative: str) -> list[dict]:
  with open(FIXTURES / relative) as f:
    return [json.loads(line) for line in f]


MATH500 = [row["answer"] for row in _rows("math500/test.jsonl")]
AIME24 = [row["answer"] for row in _rows("aime2024/test.jsonl")]


def boxed(answer: str) -> str:
  return f"The final answer is $\\boxed{{{answer}}}$."


@pytest.mark.parametrize("mode", ["strict", "lenient"])
def test_every_math500_answer_matches_itself(mode):
  assert len(MATH500) == 500
  failures = [gold for gold in MATH500 if not is_correct(boxed(gold), gold, mode=mode)]
  assert failures == []


def test_math_verify_parses_every_math500_answer_as_equal_to_itself():
  # Lenient checks settle identical strings before math-verify; this asks math-verify directly,
  # so every ground truth is known to parse into something equivalent forms can be matched to.
  worker = verify._Worker(startup_timeout_s=120)
  try:
    assert [gold for gold in MATH500 if not worker.ask(gold, gold, timeout_s=10)] == []
  finally:
    worker.close()


def test_math500_answers_in_the_dapo_and_retool_forms():
  dapo = [gold for gold in MATH500 if not is_correct(f"...\nAnswer: {gold}", gold, "strict")]
  retool = [gold for gold in MATH500 if not is_correct(f"<answer>\n\\boxed{{{gold}}}\n</answer>", gold)]
  assert dapo == [] and retool == []


@pytest.mark.parametrize("mode", ["strict", "lenient"])
def test_aime_answers_with_leading_zeros(mode):
  assert "025" in AIME24
  for gold in AIME24:
    value = int(gold)
    assert is_correct(boxed(str(value)), gold, mode), gold
    assert is_correct(boxed(gold), str(value), mode), gold
    assert is_correct(f"Answer: {value:03d}", gold, mode), gold
    assert not is_correct(boxed(str(value + 1)), gold, mode), gold
    assert not is_correct(boxed(str(value * 10)), gold, mode), gold


def test_retool_aime24_outputs_are_the_aime2024_answers():
  # The ReTool evaluation file writes the same answers without leading zeros.
  outputs = [row["output"] for row in _rows("retool_eval/AIME24.jsonl")]
  unmatched = list(AIME24)
  for output in outputs:
    match = next(gold for gold in unmatched if is_correct(boxed(output), gold, "strict"))
    unmatched.remove(match)
  assert unmatched == []


def test_gsm8k_answers_with_thousands_separators_and_dollars():
  golds = [row["answer"].split("####")[-1].strip() for row in _rows("gsm8k/test.jsonl")]
  assert any("," in gold for gold in golds)
  for gold in golds:
    value = int(gold.replace(",", ""))
    for written in (f"{value:,}", str(value), f"\\${value}.00"):
      assert is_correct(boxed(written), gold, "strict"), (written, gold)
    assert not is_correct(boxed(str(value + 1)), gold, "lenient"), gold


EQUIVALENT = [
  (r"0.5", r"\frac{1}{2}"),
  (r"\frac12", r"\dfrac{1}{2}"),
  (r"0.75", r"\tfrac{3}{4}"),
  (r"\frac{1}{2}", "0.50"),
  (r"\sqrt{8}", r"2\sqrt{2}"),
  (r"\frac{1}{2}\sqrt{3}", r"\frac{\sqrt{3}}{2}"),
  (r"\frac{\pi}{2}", r"\pi/2"),
  (r"(x+1)^2", r"x^2+2x+1"),
  (r"(3, \pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),
  (r"-2, 1", "1,-2"),
  (r"6 - 5i", "6-5i"),
  (r"\frac{270}{7}", r"\frac{270}7\text{ degrees}"),
  (r"90", r"90^\circ"),
  (r"15", r"15\mbox{ cm}^2"),
  (r"5", "x=5"),
  (r"3/56", r"\frac{3}{56}"),
  (r"1.25", r"\frac{5}{4}"),
  (r"\frac{4}{3}", r"\frac43"),
  (r"Evelyn", r"\text{Evelyn}"),
  (r"C", r"\text{(C)}"),
]

NOT_EQUIVALENT = [
  (r"0.51", r"\frac{1}{2}"),
  (r"\frac{1}{3}", r"\frac{1}{2}"),
  (r"2", r"\sqrt{2}"),
  (r"3.14", r"\pi"),
  (r"x^2+1", r"(x+1)^2"),
  (r"(2, 1)", r"(1, 2)"),
  (r"6+5i", "6-5i"),
  (r"Navin", r"\text{Evelyn}"),
  (r"2.5", "25"),
  (r"-5", "5"),
  (r"24", "204"),
  (r"\frac{2}{7}", r"\frac{270}{7}"),
]


@pytest.mark.parametrize("prediction, gold", EQUIVALENT)
def test_equivalent_forms_are_correct_in_lenient_mode(prediction, gold):
  assert is_correct(boxed(prediction), gold, mode="lenient")


@pytest.mark.parametrize("prediction, gold", NOT_EQUIVALENT)
@pytest.mark.parametrize("mode", ["strict", "lenient"])
def test_different_answers_are_wrong(prediction, gold, mode):
  assert not is_correct(boxed(prediction), gold, mode=mode)


def test_strict_mode_does_not_evaluate():
  assert not is_correct(boxed("0.5"), r"\frac{1}{2}", mode="strict")
  assert not is_correct(boxed(r"\sqrt{8}"), r"2\sqrt{2}", mode="strict")
  assert is_correct(boxed(r"\frac12"), r"\dfrac{1}{2}", mode="strict")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 999), st.integers(0, 999), st.integers(0, 3))
def test_integers_compare_by_value_whatever_the_padding(a, b, padding):
  written = str(a).zfill(len(str(a)) + padding)
  for mode in ("strict", "lenient"):
    assert is_correct(boxed(written), str(b).zfill(3), mode) is (a == b)


def test_no_answer_is_wrong():
  assert not is_correct("I think it is 42.", "42")
  extraction, verdict = judge("I think it is 42.", "42")
  assert extraction is None and not verdict.correct and not verdict.timed_out


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="mode must be one of"):
    is_correct(boxed("1"), "1", mode="exact")
  with pytest.raises(TypeError, match="ground_truth must be a str"):
    is_correct(boxed("1"), 1)
  with pytest.raises(ValueError, match="timeout_s"):
    Verifier(timeout_s=0)


def test_a_hanging_check_times_out_from_a_worker_thread_and_the_verifier_recovers():
  verifier = Verifier(timeout_s=1.0)
  try:
    # Warm the worker so the deadline measures the check alone.
    assert verifier.equivalent("0.5", r"\frac{1}{2}").correct
    outcome = {}

    def run():
      start = time.monotonic()
      # sympy tries to evaluate this power tower and does not come back.
      outcome["verdict"] = verifier.equivalent("9^{9^{9^{9}}}", "1")
      outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert outcome["verdict"].timed_out and not outcome["verdict"].correct
    assert 1.0 <= outcome["seconds"] < 5.0
    # A fresh worker serves the next check.
    assert verifier.equivalent(r"\sqrt{8}", r"2\sqrt{2}").correct
  finally:
    verifier.close()


def test_checks_from_many_threads_agree_with_sequential_ones():
  verifier = Verifier(num_workers=2)
  try:
    pairs = EQUIVALENT + NOT_EQUIVALENT
    expected = [verifier.equivalent(p, g).correct for p, g in pairs]
    verifier.clear_cache()
    results = [None] * len(pairs)

    def run(i):
      results[i] = verifier.equivalent(*pairs[i]).correct

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pairs))]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    assert results == expected
    assert sum(expected) == len(EQUIVALENT)
  finally:
    verifier.close()
