"""Subprocess that checks answer equivalence with ``math-verify``.

Run as a script by :mod:`retool_jax.rewards.verify`; it imports only the standard library and
``math_verify`` so it starts without the rest of the package. Protocol, one JSON value per line:
after start-up it writes ``"ready"``; then for each request ``[gold, prediction]`` read from stdin
it writes ``[equivalent, error]`` (``error`` a string or null). It exits when stdin closes.

Symbolic checks can run for a very long time; the parent enforces the deadline by killing this
process, so math-verify's own signal-based timeouts are switched off here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys


def main() -> None:
  # Keep the protocol channel private: anything else printed goes to stderr.
  channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

  # Imported after stdout is redirected, so nothing printed on import can reach the protocol channel.
  import math_verify  # noqa: PLC0415
  from math_verify import grader, parser  # noqa: PLC0415

  logging.getLogger("math_verify").setLevel(logging.ERROR)
  grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True

  @functools.lru_cache(maxsize=4096)
  def parse(answer: str):
    return math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=None)

  parse("1")  # loads the LaTeX grammar before reporting ready
  channel.write('"ready"\n')

  for line in sys.stdin:
    try:
      gold, prediction = json.loads(line)
      gold_parsed, pred_parsed = parse(gold), parse(prediction)
      result = bool(gold_parsed and pred_parsed) and math_verify.verify(
        gold_parsed, pred_parsed, timeout_seconds=None
      )
      reply = [bool(result), None]
    except Exception as error:  # noqa: BLE001 -- any failure is reported, never fatal
      reply = [False, f"{type(error).__name__}: {error}"[:500]]
    channel.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
  main()
