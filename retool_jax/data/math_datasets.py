"""Math problem sets -> `Example` records: DAPO-Math-17k, AIME, MATH-500, GSM8K.

Each schema has a row converter returning the bare problem, the ground truth (a string), the dataset's own
prompt messages (if any) and metadata. `load_math` detects the schema from the columns; the named loaders
check that the file has the schema they expect.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from retool_jax.data.io import field, read_rows
from retool_jax.data.prompts import build_prompt
from retool_jax.data.records import Example

# DAPO-Math-17k wraps each problem in a fixed instruction; the bare problem is recovered for other prompt styles.
_DAPO_WRAPPER = re.compile(
  r"\ASolve the following math problem step by step\. The last line of your response should be of the form "
  r"Answer: .*? where \$Answer is the answer to the problem\.\n\n(?P<problem>.*)\n\n"
  r"Remember to put your answer on its own line after \"Answer:\"\.\Z",
  re.DOTALL,
)


class Row(NamedTuple):
  problem: str
  ground_truth: str
  messages: list[dict[str, Any]] | None
  metadata: dict[str, Any]


def _answer(value: Any, where: str, name: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise ValueError(f"{where}: field {name!r} must be a string or number, got {type(value).__name__}")
  text = str(value).strip()
  if not text:
    raise ValueError(f"{where}: field {name!r} is empty")
  return text


def _user_messages(value: Any, where: str, name: str) -> list[dict[str, Any]]:
  if not isinstance(value, list) or not value:
    raise ValueError(f"{where}: field {name!r} must be a non-empty list of messages")
  for j, m in enumerate(value):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"{where}: {name}[{j}] must have string 'role' and 'content'")
  return [{"role": m["role"], "content": m["content"]} for m in value]


def _dapo_problem(messages: list[dict[str, Any]]) -> str:
  content = messages[-1]["content"]
  match = _DAPO_WRAPPER.match(content)
  return match.group("problem") if match else content


def dapo_slime_row(row: Mapping[str, Any], where: str) -> Row:
  """slime / zhuzilin/dapo-math-17k: `{"prompt": [messages], "label": str}`."""
  messages = _user_messages(field(row, "prompt", where, list), where, "prompt")
  truth = _answer(field(row, "label", where, (str, int, float)), where, "label")
  return Row(_dapo_problem(messages), truth, messages, {"source": "dapo_math_17k", "schema": "slime"})


def dapo_original_row(row: Mapping[str, Any], where: str) -> Row:
  """BytedTsinghua-SIA/DAPO-Math-17k: `{"prompt": [messages], "reward_model": {"ground_truth"}, ...}`.

  The ROLL variant (bare `prompt` string, messages in `source_prompt`) is read too.
  """
  key = "source_prompt" if isinstance(row.get("prompt"), str) and "source_prompt" in row else "prompt"
  messages = _user_messages(field(row, key, where, list), where, key)
  reward_model = field(row, "reward_model", where, Mapping)
  truth = _answer(reward_model.get("ground_truth"), where, "reward_model.ground_truth")
  metadata = {"source": "dapo_math_17k", "schema": "roll" if key == "source_prompt" else "original"}
  if isinstance(row.get("extra_info"), Mapping) and "index" in row["extra_info"]:
    metadata["id"] = row["extra_info"]["index"]
  if row.get("data_source"):
    metadata["data_source"] = row["data_source"]
  problem = row["prompt"] if key == "source_prompt" else _dapo_problem(messages)
  return Row(problem, truth, messages, metadata)


def _aime_answer(answer: str) -> str:
  """AIME answers are integers 0-999; some files write them with leading zeros ("025")."""
  return str(int(answer)) if answer.isdigit() else answer


def aime_row(row: Mapping[str, Any], where: str) -> Row:
  """Qwen2.5-Math AIME files: `{"id", "problem", "answer", "solution", "url"}`."""
  raw = _answer(field(row, "answer", where, (str, int)), where, "answer")
  metadata = {"source": "aime", "answer_raw": raw}
  for key in ("id", "url"):
    if row.get(key) is not None:
      metadata[key] = row[key]
  return Row(field(row, "problem", where), _aime_answer(raw), None, metadata)


def aime_retool_row(row: Mapping[str, Any], where: str) -> Row:
  """ReTool evaluation files: `{"input": problem, "output": answer}`."""
  raw = _answer(field(row, "output", where, (str, int)), where, "output")
  return Row(field(row, "input", where), _aime_answer(raw), None, {"source": "aime", "answer_raw": raw})


def math500_row(row: Mapping[str, Any], where: str) -> Row:
  """MATH-500: `{"problem", "answer", "solution", "subject", "level", "unique_id"}`."""
  metadata = {"source": "math500"}
  for key in ("subject", "level", "unique_id"):
    if row.get(key) is not None:
      metadata[key] = row[key]
  return Row(field(row, "problem", where), _answer(field(row, "answer", where), where, "answer"), None, metadata)


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*\Z", re.DOTALL)


def gsm8k_row(row: Mapping[str, Any], where: str) -> Row:
  """GSM8K: `{"question", "answer"}` where the answer is a worked solution ending in `#### 42`."""
  solution = field(row, "answer", where)
  match = _GSM8K_FINAL.search(solution)
  if match is None:
    raise ValueError(f"{where}: field 'answer' has no final '#### <number>' line: {solution[-80:]!r}")
  truth = match.group(1).replace(",", "")
  metadata = {"source": "gsm8k", "solution": solution[: match.start()].rstrip()}
  if row.get("idx") is not None:
    metadata["id"] = row["idx"]
  return Row(field(row, "question", where), truth, None, metadata)


SCHEMAS: dict[str, Callable[[Mapping[str, Any], str], Row]] = {
  "dapo_slime": dapo_slime_row,
  "dapo": dapo_original_row,
  "aime": aime_row,
  "aime_retool": aime_retool_row,
  "math500": math500_row,
  "gsm8k": gsm8k_row,
}


def detect_schema(columns: list[str]) -> str:
  """The schema name for a file with these columns."""
  cols = set(columns)
  if {"prompt", "label"} <= cols:
    return "dapo_slime"
  if {"prompt", "reward_model"} <= cols:
    return "dapo"
  if {"input", "output"} <= cols:
    return "aime_retool"
  if {"question", "answer"} <= cols and "problem" not in cols:
    return "gsm8k"
  if {"problem", "answer"} <= cols:
    return "math500" if {"subject", "level", "unique_id"} & cols else "aime"
  raise ValueError(
    f"unrecognised math dataset columns {sorted(cols)}; expected one of the schemas {sorted(SCHEMAS)}"
  )


def load_math(
  path: str | os.PathLike,
  *,
  schema: str = "auto",
  prompt_style: str = "raw",
  system_prompt: str | None = None,
  limit: int | None = None,
) -> list[Example]:
  """Loads a math problem file (json/jsonl/parquet) as `Example` records.

  `schema` is one of `SCHEMAS` or ``auto``; `prompt_style` is as in `build_prompt` (``raw`` keeps the
  dataset's own prompt, ``retool`` uses the ReTool prompt around the bare problem).
  """
  rows = read_rows(path, limit=limit)
  name = detect_schema(rows.column_names) if schema == "auto" else schema
  if name not in SCHEMAS:
    raise ValueError(f"unknown schema {schema!r}; expected 'auto' or one of {sorted(SCHEMAS)}")
  convert = SCHEMAS[name]
  examples = []
  for i, row in enumerate(rows):
    where = f"{path}: row {i}"
    problem, truth, messages, metadata = convert(row, where)
    prompt = build_prompt(problem, prompt_style, original=messages, system_prompt=system_prompt)
    examples.append(Example(prompt, truth, {**metadata, "problem": problem, "index": i}))
  return examples


def _checked(schemas: tuple[str, ...]) -> Callable[..., list[Example]]:
  def load(path: str | os.PathLike, **kwargs: Any) -> list[Example]:
    found = detect_schema(read_rows(path, limit=1).column_names)
    if found not in schemas:
      raise ValueError(f"{path}: columns look like the {found!r} schema, expected one of {schemas}")
    return load_math(path, schema=found, **kwargs)

  load.__doc__ = f"`load_math` for files in the {' / '.join(schemas)} schema."
  return load


load_dapo_math = _checked(("dapo_slime", "dapo"))
load_aime = _checked(("aime", "aime_retool"))
load_math500 = _checked(("math500",))
load_gsm8k = _checked(("gsm8k",))
