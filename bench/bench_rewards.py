"""Per-call cost of answer verification, against math-verify called in-process.

Workload: every MATH-500 ground truth paired with (a) itself, written as a model would box it,
and (b) another problem's answer (a wrong answer, which cheap rules rarely settle). Baseline:
``math_verify.verify(parse(gold), parse(pred))`` in the main thread with its own signal timeout --
the usual way to call it, which cannot run in a worker thread. Measured: ``Verifier.equivalent``
(subprocess with a deadline, uncached), the same with a warm cache (a GRPO group repeats answers),
strict mode, pairs that only math-verify can settle, and the bare round trip to the worker.
Run: ``python bench/bench_rewards.py``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import math_verify

from retool_jax.rewards import Verifier, normalize_answer
from retool_jax.rewards.normalize import as_number

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)


def _pairs() -> list[tuple[str, str]]:
  with open(FIXTURES / "math500" / "test.jsonl") as f:
    golds = [json.loads(line)["answer"] for line in f]
  others = golds[:]
  random.Random(0).shuffle(others)
  return [(gold, gold) for gold in golds] + list(zip(others, golds))


def _needs_math_verify(pred: str, gold: str) -> bool:
  pred, gold = normalize_answer(pred), normalize_answer(gold)
  return pred != gold and (as_number(pred) is None or as_number(gold) is None)


def _per_call_ms(fn, pairs) -> float:
  start = time.perf_counter()
  for pred, gold in pairs:
    fn(pred, gold)
  return (time.perf_counter() - start) / len(pairs) * 1e3


def _inline(pred: str, gold: str) -> bool:
  gold_parsed = math_verify.parse(f"\\boxed{{{gold}}}")
  return math_verify.verify(gold_parsed, math_verify.parse(f"\\boxed{{{pred}}}"))


def main() -> None:
  pairs = _pairs()
  verifier = Verifier(timeout_s=5.0)
  verifier.equivalent("0.5", r"\frac{1}{2}")  # start the worker
  _inline("0.5", r"\frac{1}{2}")  # load math-verify's grammar

  baseline = _per_call_ms(_inline, pairs)
  verifier.clear_cache()
  uncached = _per_call_ms(lambda p, g: verifier.equivalent(p, g, "lenient"), pairs)
  cached = _per_call_ms(lambda p, g: verifier.equivalent(p, g, "lenient"), pairs)
  strict = _per_call_ms(lambda p, g: verifier.equivalent(p, g, "strict"), pairs)
  # Pairs only math-verify can settle, unseen by either process: the subprocess overhead.
  doubled = [(f"2\\cdot({gold})", gold) for gold, _ in pairs[: len(pairs) // 2]]
  hard = [pair for pair in doubled if _needs_math_verify(*pair)]
  hard_worker = _per_call_ms(lambda p, g: verifier.equivalent(p, g, "lenient"), hard)
  hard_baseline = _per_call_ms(_inline, hard)
  # One trivial symbolic pair, verdict cache cleared each time: the round trip to the worker.
  trivial = [("1+x", "x+1")] * 2000
  trivial_baseline = _per_call_ms(_inline, trivial)
  trivial_worker = _per_call_ms(lambda p, g: (verifier.clear_cache(), verifier.equivalent(p, g)), trivial)
  verifier.close()

  rows = [
    (f"baseline: math-verify in-process, all {len(pairs)} pairs", baseline),
    ("Verifier lenient, uncached", uncached),
    ("Verifier lenient, cached", cached),
    ("Verifier strict", strict),
    (f"baseline: math-verify in-process, {len(hard)} pairs only it settles", hard_baseline),
    ("Verifier lenient, those pairs (worker subprocess)", hard_worker),
    ("baseline: math-verify in-process, x+1 vs 1+x", trivial_baseline),
    ("Verifier lenient, x+1 vs 1+x uncached (round trip)", trivial_worker),
  ]
  references = [baseline] * 4 + [hard_baseline] * 2 + [trivial_baseline] * 2
  for (name, ms), reference in zip(rows, references):
    print(f"{name:58s} {ms * 1e3:10.1f} us/call  {ms / reference:8.4f}x baseline")


if __name__ == "__main__":
  main()
