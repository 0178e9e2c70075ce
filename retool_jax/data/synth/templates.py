"""Templated tool-use conversations whose tool results were really produced by the tool.

Each task has several phrasings of the question, draws random parameters, and builds the tool call from
them. The call is executed through the tool registry and the recorded output is what the conversation shows
and what the final answer quotes; a call that fails is dropped. Nothing in the data is computed by the
generator itself, so the data cannot disagree with the tool.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from retool_jax.chat.parse import CODE_TOOL
from retool_jax.data.prompts import build_prompt
from retool_jax.data.records import ChatExample

FORMATS = ("qwen", "retool")


@dataclasses.dataclass(frozen=True)
class Task:
  """A family of questions answered by one tool call."""

  name: str
  tool: str
  questions: tuple[str, ...]
  sample: Callable[[random.Random], dict[str, Any]]
  arguments: Callable[[dict[str, Any]], dict[str, Any]]
  answers: tuple[str, ...] = (
    "The computation gives {output}.",
    "So the answer is {output}.",
    "The tool returns {output}, which is the answer.",
  )
  boxed: bool = True  # the output is the final answer (quoted in \\boxed{})
  accept_failure: bool = False  # a failing call is still a true answer (e.g. failing tests)


def _code(source: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
  return lambda fields: {"code": source.format(**fields)}


CODE_TASKS = (
  Task(
    "product",
    CODE_TOOL,
    ("What is {a} times {b}?", "Compute {a} × {b}.", "Multiply {a} by {b}.", "What do you get from {a}*{b}?"),
    lambda r: {"a": r.randint(1000, 99999), "b": r.randint(1000, 99999)},
    _code("print({a} * {b})"),
  ),
  Task(
    "power_mod",
    CODE_TOOL,
    (
      "What is {a}^{b} mod {m}?",
      "Find the remainder when {a} to the power {b} is divided by {m}.",
      "Compute {a}**{b} modulo {m}.",
    ),
    lambda r: {"a": r.randint(2, 999), "b": r.randint(50, 5000), "m": r.randint(7, 10007)},
    _code("print(pow({a}, {b}, {m}))"),
  ),
  Task(
    "count_primes",
    CODE_TOOL,
    (
      "How many primes are there below {n}?",
      "Count the prime numbers less than {n}.",
      "How many n < {n} are prime?",
    ),
    lambda r: {"n": r.randint(100, 200000)},
    _code(
      "n = {n}\nsieve = bytearray([1]) * n\nsieve[:2] = b'\\x00\\x00'\n"
      "for p in range(2, int(n ** 0.5) + 1):\n    if sieve[p]:\n"
      "        sieve[p * p :: p] = bytearray(len(range(p * p, n, p)))\nprint(sum(sieve))"
    ),
  ),
  Task(
    "sum_of_squares",
    CODE_TOOL,
    (
      "What is the sum of the squares of the integers from 1 to {n}?",
      "Compute 1^2 + 2^2 + ... + {n}^2.",
      "Add up k squared for k = 1, ..., {n}.",
    ),
    lambda r: {"n": r.randint(10, 5000)},
    _code("print(sum(k * k for k in range(1, {n} + 1)))"),
  ),
  Task(
    "factorial_digits",
    CODE_TOOL,
    (
      "How many digits does {n}! have?",
      "Count the decimal digits of the factorial of {n}.",
      "How long is {n}! written out?",
    ),
    lambda r: {"n": r.randint(20, 3000)},
    _code("import math\nprint(len(str(math.factorial({n}))))"),
  ),
  Task(
    "gcd",
    CODE_TOOL,
    (
      "What is the greatest common divisor of {a} and {b}?",
      "Find gcd({a}, {b}).",
      "What is the largest integer dividing both {a} and {b}?",
    ),
    lambda r: (lambda g: {"a": g * r.randint(2, 9999), "b": g * r.randint(2, 9999)})(r.randint(1, 999)),
    _code("import math\nprint(math.gcd({a}, {b}))"),
  ),
  Task(
    "fibonacci",
    CODE_TOOL,
    (
      "What is the {n}th Fibonacci number (F1 = F2 = 1)?",
      "Compute F({n}) where F(1) = F(2) = 1 and F(n) = F(n-1) + F(n-2).",
    ),
    lambda r: {"n": r.randint(30, 300)},
    _code("a, b = 1, 1\nfor _ in range({n} - 2):\n    a, b = b, a + b\nprint(b)"),
  ),
  Task(
    "sort",
    CODE_TOOL,
    (
      "Sort these numbers in increasing order: {numbers}.",
      "Put {numbers} in ascending order.",
      "Order from smallest to largest: {numbers}.",
    ),
    lambda r: {"numbers": ", ".join(str(r.randint(-999, 999)) for _ in range(r.randint(5, 12)))},
    _code("print(sorted([{numbers}]))"),
  ),
)
REPORT = (
  "Here is what the tool reported:\n\n{output}",
  "The result:\n\n{output}",
  "This is the output:\n\n{output}",
)
_WORDS = (
  "apple",
  "river",
  "quartz",
  "falcon",
  "maple",
  "ember",
  "tundra",
  "violet",
  "cobalt",
  "harbor",
  "lantern",
)
_FUNCTIONS = (  # (name, correct body, buggy body, tests)
  ("add", "return a + b", "return a - b", "assert add(2, 3) == 5\n    assert add(-1, 1) == 0"),
  ("is_even", "return n % 2 == 0", "return n % 2 == 1", "assert is_even(4)\n    assert not is_even(7)"),
  ("largest", "return max(xs)", "return xs[0]", "assert largest([3, 9, 2]) == 9\n    assert largest([5]) == 5"),
)
_PARAMS = {"add": "a, b", "is_even": "n", "largest": "xs"}
_FAILING = (
  ("values = [1, 2, 3]\nprint(values[{n}])", "IndexError: list index out of range"),
  ("counts = {{'a': 1}}\nprint(counts['{word}'])", "KeyError: '{word}'"),
  ("total = {n}\nprint(total / (total - {n}))", "ZeroDivisionError: division by zero"),
)
_SNIPPETS = (
  "def area(r)\n    return 3.14159 * r * r",
  "def area(r):\n    return 3.14159 * r * r",
  "for i in range({n}):\n    print(i",
  "total = 0\nfor i in range({n}):\n    total += i\nprint(total)",
)
_DOC_TOPICS = (
  "greatest common divisor",
  "combinations of a list",
  "binomial coefficient",
  "sorting with a key",
  "parse JSON text",
  "a double-ended queue",
  "a heap priority queue",
  "regular expression substitution",
  "random sample without replacement",
  "least common multiple",
  "cartesian product",
)


def _tests_code(f: dict[str, Any]) -> str:
  body = f"def {f['fn']}({_PARAMS[f['fn']]}):\n    {f['body']}\n\n\ndef test_{f['fn']}():\n    {f['tests']}\n"
  return body


def _sample_tests(r: random.Random) -> dict[str, Any]:
  fn, good, bad, tests = r.choice(_FUNCTIONS)
  return {"fn": fn, "body": r.choice((good, bad)), "tests": tests}


def _sample_failing(r: random.Random) -> dict[str, Any]:
  code, error = r.choice(_FAILING)
  fields = {"n": r.randint(5, 50), "word": r.choice(_WORDS)}
  return {"code": code.format(**fields), "error": error.format(**fields)}


OTHER_TASKS = (
  Task(
    "calculator",
    "calculator",
    ("What is {expression}?", "Evaluate {expression} exactly.", "Compute {expression} and give an exact result."),
    lambda r: {
      "expression": r.choice(
        ("{a}/{b} + {c}/{d}", "{a}^{e} - {b}", "sqrt({s}) * {c}", "binomial({n}, {k})")
      ).format(
        a=r.randint(2, 99),
        b=r.randint(2, 99),
        c=r.randint(2, 99),
        d=r.randint(2, 99),
        e=r.randint(5, 30),
        s=r.randint(2, 999),
        n=r.randint(10, 60),
        k=r.randint(2, 9),
      )
    },
    lambda f: {"expression": f["expression"]},
  ),
  Task(
    "bash_word_count",
    "execute_bash",
    (
      "Use the shell to count the words in: {sentence}",
      "How many words are in \"{sentence}\"? Check with wc.",
    ),
    lambda r: {"sentence": " ".join(r.choice(_WORDS) for _ in range(r.randint(3, 12)))},
    lambda f: {"command": f"echo '{f['sentence']}' | wc -w"},
  ),
  Task(
    "bash_sort",
    "execute_bash",
    ("Sort these words alphabetically with a shell command: {words}", "Use sort to order: {words}"),
    lambda r: {"words": " ".join(r.sample(_WORDS, r.randint(3, 8)))},
    lambda f: {"command": f"printf '%s\\n' {f['words']} | sort"},
    answers=REPORT,
    boxed=False,
  ),
  Task(
    "run_tests",
    "run_tests",
    (
      "Does this implementation pass its test?\n\n```python\n{code}```",
      "Run the test below and tell me if it passes.\n\n```python\n{code}```",
    ),
    lambda r: (lambda f: {**f, "code": _tests_code(f)})(_sample_tests(r)),
    lambda f: {"code": f["code"], "test_framework": "pytest"},
    answers=REPORT,
    boxed=False,
    accept_failure=True,
  ),
  Task(
    "analyze_syntax",
    "analyze_code",
    (
      "Is this code syntactically valid?\n\n```python\n{code}\n```",
      "Check this snippet for syntax errors:\n\n```python\n{code}\n```",
    ),
    lambda r: {"code": r.choice(_SNIPPETS).format(n=r.randint(2, 20))},
    lambda f: {"code": f["code"], "analysis_type": "syntax"},
    answers=REPORT,
    boxed=False,
  ),
  Task(
    "debug",
    "debug_code",
    (
      "This code fails with `{error}`. Why?\n\n```python\n{code}\n```",
      "I get {error} when running:\n\n```python\n{code}\n```\nWhat is wrong?",
    ),
    _sample_failing,
    lambda f: {"code": f["code"], "error": f["error"]},
    answers=REPORT,
    boxed=False,
  ),
  Task(
    "search_docs",
    "search_docs",
    (
      "Which Python standard-library function handles {topic}?",
      "How do I get {topic} in Python's standard library?",
    ),
    lambda r: {"topic": r.choice(_DOC_TOPICS)},
    lambda f: {"query": f["topic"]},
    answers=("The documentation search finds:\n\n{output}", "From the standard-library docs:\n\n{output}"),
    boxed=False,
  ),
)
TASKS: dict[str, tuple[Task, ...]] = {CODE_TOOL: CODE_TASKS}
for _task in OTHER_TASKS:
  TASKS[_task.tool] = TASKS.get(_task.tool, ()) + (_task,)

INTROS = (
  "Let me compute this with Python.",
  "I'll run a quick calculation to be exact.",
  "This is easy to get wrong by hand, so I'll use a tool.",
  "Let me check with a tool.",
)


def _conversation(
  question: str, intro: str, answer: str, tool: str, arguments: dict[str, Any], output: str, fmt: str, boxed: bool
) -> list[dict[str, Any]]:
  final = f"{answer}\n\n\\boxed{{{output}}}" if boxed and "\n" not in output else answer
  if fmt == "qwen":
    return [
      {"role": "user", "content": question},
      {
        "role": "assistant",
        "content": intro,
        "tool_calls": [{"type": "function", "function": {"name": tool, "arguments": arguments}}],
      },
      {"role": "tool", "content": output},
      {"role": "assistant", "content": final},
    ]
  code = arguments["code"]
  turn = (
    f"{intro}\n<code>\n```python\n{code}\n```\n</code>\n<interpreter>\n{output}\n</interpreter>\n\n"
    f"{answer}\n<answer>\n\\boxed{{{output}}}\n</answer>"
  )
  return build_prompt(question, "retool") + [{"role": "assistant", "content": turn}]


def templated_examples(registry: Any, n: int, *, seed: int = 0, fmt: str = "qwen") -> list[ChatExample]:
  """`n` conversations over the registry's tools that have templates; each call executed for real.

  `fmt` is ``qwen`` (`tool_calls` + `tool` messages, tool schemas attached) or ``retool`` (the inline
  `<code>` / `<interpreter>` format, code tasks only).
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  tasks = [t for name in registry.names() for t in TASKS.get(name, ()) if fmt == "qwen" or t.tool == CODE_TOOL]
  if not tasks:
    raise ValueError(f"no templates for any tool in the registry ({registry.names()}); templates: {sorted(TASKS)}")
  rng = random.Random(seed)
  schemas = registry.schemas()
  examples: list[ChatExample] = []
  attempts = 0
  while len(examples) < n and attempts < 4 * n + 10:
    attempts += 1
    task = tasks[attempts % len(tasks)] if attempts <= len(tasks) else rng.choice(tasks)
    fields = task.sample(rng)
    arguments = task.arguments(fields)
    result = registry.call_sync(task.tool, arguments)
    output = result.output.strip()
    if not output or not (result.ok or task.accept_failure):
      continue
    question = rng.choice(task.questions).format(**fields)
    answer = rng.choice(task.answers).format(output=output)
    messages = _conversation(question, rng.choice(INTROS), answer, task.tool, arguments, output, fmt, task.boxed)
    metadata = {"source": "synth_templates", "task": task.name, "tool": task.tool, "status": result.status}
    examples.append(ChatExample(messages, schemas if fmt == "qwen" else None, metadata))
  return examples
