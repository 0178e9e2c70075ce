"""Math problem loaders on the real fixture files."""

import collections
import json
import os
from pathlib import Path

import datasets
import pytest

from retool_jax.data import (
  build_prompt,
  detect_schema,
  load_aime,
  load_dapo_math,
  load_gsm8k,
  load_math,
  load_math500,
  retool_template,
)

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)
DAPO = FIXTURES / "dapo_math_17k"


def test_dapo_schemas_agree():
  slime = load_dapo_math(DAPO / "dapo_math_17k_slime_format.first27.jsonl")
  original = load_dapo_math(DAPO / "dapo_math_17k_original_schema.first14.jsonl")
  roll = load_dapo_math(DAPO / "dapo_math_17k_roll_format.first14.jsonl")
  assert (len(slime), len(original), len(roll)) == (27, 14, 14)
  assert (
    [e.ground_truth for e in slime[:14]] == [e.ground_truth for e in original] == [e.ground_truth for e in roll]
  )
  assert slime[2].ground_truth == "-3" and all(isinstance(e.ground_truth, str) for e in slime)
  # The bare problem recovered from the instruction wrapper equals ROLL's separately stored bare problem.
  assert [e.metadata["problem"] for e in slime[:14]] == [e.metadata["problem"] for e in roll]
  assert [e.metadata["problem"] for e in original] == [e.metadata["problem"] for e in roll]
  # raw style keeps the dataset's own prompt messages.
  first = json.loads((DAPO / "dapo_math_17k_slime_format.first27.jsonl").open().readline())
  assert slime[0].prompt == first["prompt"]
  assert original[0].metadata["id"] == "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"
  assert {e.metadata["schema"] for e in slime + original + roll} == {"slime", "original", "roll"}


def test_aime_schemas_agree():
  qwen = load_aime(FIXTURES / "aime2024" / "test.jsonl")
  retool = load_aime(FIXTURES / "retool_eval" / "AIME24.jsonl")
  assert len(qwen) == len(retool) == 30
  # "025" and "25" are the same AIME answer; both files give the same multiset of ground truths.
  assert collections.Counter(e.ground_truth for e in qwen) == collections.Counter(e.ground_truth for e in retool)
  assert qwen[7].ground_truth == "25" and qwen[7].metadata["answer_raw"] == "025"
  assert qwen[0].metadata["id"] == 60 and qwen[0].prompt[0]["content"].startswith("Every morning Aya")
  assert len(load_aime(FIXTURES / "retool_eval" / "AIME25.jsonl")) == 30


def test_math500_and_gsm8k():
  math500 = load_math500(FIXTURES / "math500" / "test.jsonl")
  assert len(math500) == 500
  assert math500[0].ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"
  assert math500[0].metadata["level"] == 2 and math500[0].metadata["subject"] == "Precalculus"
  gsm8k = load_gsm8k(FIXTURES / "gsm8k" / "test.jsonl")
  assert len(gsm8k) == 1319 and gsm8k[0].ground_truth == "18"
  assert all(e.ground_truth.lstrip("-").isdigit() for e in gsm8k)  # "1,450,000" -> "1450000"
  assert "1450000" in {e.ground_truth for e in gsm8k}
  assert gsm8k[0].metadata["solution"].endswith("= $<<9*2=18>>18 every day at the farmer’s market.")


def test_prompt_styles():
  path = DAPO / "dapo_math_17k_slime_format.first27.jsonl"
  example = load_math(path, prompt_style="retool", system_prompt="You are careful.", limit=2)[0]
  assert len(load_math(path, limit=2)) == 2
  assert example.prompt[0] == {"role": "system", "content": "You are careful."}
  text = example.prompt[1]["content"]
  assert text == retool_template().format(query=example.metadata["problem"])
  assert "{query}" not in text and "\\boxed{'The final answer goes here.'}" in text
  assert build_prompt("1+1?", "Q: {query}\nA:") == [{"role": "user", "content": "Q: 1+1?\nA:"}]
  assert build_prompt("1+1?", "problem") == [{"role": "user", "content": "1+1?"}]
  with pytest.raises(ValueError, match="unknown prompt style"):
    build_prompt("x", "fancy")


def test_parquet_input(tmp_path):
  rows = [json.loads(line) for line in (DAPO / "dapo_math_17k_slime_format.first27.jsonl").open()]
  datasets.Dataset.from_list(rows).to_parquet(tmp_path / "dapo.parquet")
  assert [e.ground_truth for e in load_dapo_math(tmp_path / "dapo.parquet")] == [r["label"] for r in rows]
  # The original DAPO-Math-17k release is parquet with a nested `reward_model` struct.
  original = DAPO / "dapo_math_17k_original_schema.first14.jsonl"
  rows = [json.loads(line) for line in original.open()]
  datasets.Dataset.from_list(rows).to_parquet(tmp_path / "original.parquet")
  assert load_dapo_math(tmp_path / "original.parquet") == load_dapo_math(original)


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_errors_name_the_file_row_and_field(tmp_path):
  bad = write_jsonl(
    tmp_path / "gsm.jsonl", [{"question": "q", "answer": "#### 3"}, {"question": "q", "answer": "4"}]
  )
  with pytest.raises(ValueError, match=r"gsm.jsonl: row 1: field 'answer' has no final '#### <number>'"):
    load_gsm8k(bad)
  missing = write_jsonl(tmp_path / "dapo.jsonl", [{"prompt": [{"role": "user", "content": "x"}], "label": None}])
  with pytest.raises(ValueError, match=r"dapo.jsonl: row 0: missing field 'label'"):
    load_math(missing, schema="dapo_slime")
  with pytest.raises(ValueError, match="expected one of"):
    load_gsm8k(FIXTURES / "aime2024" / "test.jsonl")
  with pytest.raises(ValueError, match="unrecognised math dataset columns"):
    detect_schema(["text"])
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_math(tmp_path / "nope.jsonl")
  (tmp_path / "x.csv").write_text("a\n1\n")
  with pytest.raises(ValueError, match="unsupported file type '.csv'"):
    load_math(tmp_path / "x.csv")
