"""TFDS builders prepared from the shared fixtures read back exactly what the plain loaders give."""

import json
import os
from pathlib import Path

import pytest

pytest.importorskip(
  "tensorflow_datasets", reason="tensorflow-datasets is not installed (the [tfds] extra: pip install -e '.[tfds]')"
)

import tensorflow_datasets as tfds  # noqa: E402

from retool_jax.data import (  # noqa: E402
  ChatExample,
  Example,
  load_aime,
  load_chat_sft,
  load_dapo_math,
  load_gsm8k,
  load_math500,
  load_preference_pairs,
  load_retool_sft,
)
from retool_jax.data import tfds as rtfds  # noqa: E402
from retool_jax.data.pipeline import InputPipeline  # noqa: E402
from retool_jax.data.tfds.__main__ import main  # noqa: E402

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)
DAPO = FIXTURES / "dapo_math_17k"
RETOOL_ANSWER = (
  "Count the primes.\n\n<code>\n```python\nfrom sympy import primepi\nprint(primepi(29))\n```\n</code>\n"
  "<interpreter>\n10\n</interpreter>\n\nSo there are 10.\n<answer>\n\\boxed{10}\n</answer>"
)
CODE_SCHEMA = {
  "type": "function",
  "function": {
    "name": "code_interpreter",
    "description": "Run Python code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
  },
}
SEARCH_SCHEMA = {
  "type": "function",
  "function": {
    "name": "search",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
  },
}

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return path


def records(builder, split):
  return list(rtfds.load_records(builder, split))


def test_math_builders_match_the_loaders(data_dir):
  aime24 = rtfds.prepare("aime2024", data_dir=data_dir, manual_dir=FIXTURES / "aime2024")
  assert list(aime24.info.splits) == ["test"] and str(aime24.info.version) == "1.0.0"
  assert set(aime24.info.features) == {"prompt", "ground_truth", "metadata"}
  assert records(aime24, "test") == load_aime(FIXTURES / "aime2024" / "test.jsonl")

  # A config with the ReTool prompt, files named relative to the manual directory.
  config = rtfds.MathConfig(name="retool_eval", prompt_style="retool", files={"test": "AIME25.jsonl"})
  aime25 = rtfds.prepare("aime2025", data_dir=data_dir, manual_dir=FIXTURES / "retool_eval", config=config)
  want = load_aime(FIXTURES / "retool_eval" / "AIME25.jsonl", prompt_style="retool")
  assert records(aime25, "test") == want and "{query}" not in want[0].prompt[0]["content"]

  math500 = rtfds.prepare("math500", data_dir=data_dir, manual_dir=FIXTURES / "math500")
  assert records(math500, "test") == load_math500(FIXTURES / "math500" / "test.jsonl")

  gsm8k = rtfds.prepare("gsm8k", data_dir=data_dir, manual_dir=FIXTURES / "gsm8k")
  assert list(gsm8k.info.splits) == ["test"]  # only the splits whose files exist
  got = rtfds.load_records(gsm8k, "test")
  assert len(got) == 1319 and list(got) == load_gsm8k(FIXTURES / "gsm8k" / "test.jsonl")


@pytest.mark.parametrize("name", ["slime_format.first27", "original_schema.first14", "roll_format.first14"])
def test_dapo_builder_reads_every_schema(data_dir, name):
  path = DAPO / f"dapo_math_17k_{name}.jsonl"
  config = rtfds.MathConfig(name=name.split("_")[0], files={"train": str(path)})
  builder = rtfds.prepare("dapo_math_17k", data_dir=data_dir, config=config)
  assert records(builder, "train") == load_dapo_math(path)


def test_sft_builders_match_the_loaders(data_dir, tmp_path):
  retool_dir = tmp_path / "retool"
  retool_dir.mkdir()
  rows = [
    {
      "messages": [
        {"role": "user", "content": f"Question {i}: how many primes below 30? é"},
        {"role": "assistant", "content": RETOOL_ANSWER},
      ]
    }
    for i in range(3)
  ]
  path = write_jsonl(retool_dir / "train.jsonl", rows)
  for style in ("inline", "tool_calls"):
    builder = rtfds.prepare("retool_sft", data_dir=data_dir, manual_dir=retool_dir, config=style)
    got = records(builder, "train")
    assert got == load_retool_sft(path, style=style) and all(isinstance(r, ChatExample) for r in got)
  assert [m["role"] for m in got[0].messages] == ["user", "assistant", "tool", "assistant"]

  chat_dir = tmp_path / "chat"
  chat_dir.mkdir()
  chat = [
    {
      "messages": [
        {"role": "user", "content": "2**10?"},
        {
          "role": "assistant",
          "content": "",
          "tool_calls": [
            {
              "type": "function",
              "function": {"name": "code_interpreter", "arguments": "{\"code\": \"print(2**10)\"}"},
            }
          ],
        },
        {"role": "tool", "content": "1024"},
        {"role": "assistant", "content": "1024"},
      ],
      "tools": [CODE_SCHEMA],
      "metadata": {"origin": "synth", "score": 0.5},
    },
    {
      "messages": [
        {"role": "user", "content": "news?"},
        {
          "role": "assistant",
          "content": "",
          "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "news"}}}],
        },
        {"role": "tool", "content": "none"},
        {"role": "assistant", "content": "Nothing new."},
      ],
      "tools": json.dumps([SEARCH_SCHEMA]),
    },
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
  ]
  train = write_jsonl(chat_dir / "train.jsonl", chat)
  validation = write_jsonl(chat_dir / "validation.jsonl", chat[2:])
  builder = rtfds.prepare("chat_sft", data_dir=data_dir, manual_dir=chat_dir)
  assert sorted(builder.info.splits) == ["train", "validation"]
  got = records(builder, "train")
  assert got == load_chat_sft(train) and records(builder, "validation") == load_chat_sft(validation)
  assert got[1].tools == [SEARCH_SCHEMA] and got[2].tools is None and got[0].metadata["score"] == 0.5

  dpo_dir = tmp_path / "dpo"
  dpo_dir.mkdir()
  pairs = [
    {
      "prompt": [{"role": "user", "content": "2+2?"}],
      "chosen": [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}],
      "tools": [CODE_SCHEMA],
    },
    {
      "prompt": [{"role": "user", "content": "Hi"}],
      "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
    },
  ]
  dpo = write_jsonl(dpo_dir / "train.jsonl", pairs)
  builder = rtfds.prepare("preference_pairs", data_dir=data_dir, manual_dir=dpo_dir)
  assert set(builder.info.features) == {"prompt", "chosen", "rejected", "tools", "metadata"}
  assert records(builder, "train") == load_preference_pairs(dpo)


def test_prepared_directory_feeds_the_pipeline_on_four_hosts(data_dir):
  builder = rtfds.prepare("math500", data_dir=data_dir, manual_dir=FIXTURES / "math500")
  # Another host reads the prepared directory without the builder code; 500 % 64 = 52 -> one padded batch.
  source = rtfds.load_records(builder.data_dir, "test")
  assert len(source) == 500 and source[-1] == source[499]
  pipes = [InputPipeline(source, global_batch_size=64, seed=0, process_index=h, process_count=4) for h in range(4)]
  seen = []
  for _ in range(8):
    for pipe in pipes:
      batch = next(pipe)
      assert len(batch.examples) == 16 and all(isinstance(e, Example) for e in batch.examples)
      seen += [e.metadata["index"] for e, valid in zip(batch.examples, batch.mask) if valid]
  assert sorted(seen) == list(range(500)) and pipes[0].state()["epoch"] == 1


def test_errors_name_what_is_wrong(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="math500: .*manual directory"):
    rtfds.prepare("math500", data_dir=data_dir / "other", manual_dir=tmp_path / "missing")
  (tmp_path / "wrong").mkdir()
  (tmp_path / "wrong" / "train.jsonl").write_text("{}\n")
  with pytest.raises(FileNotFoundError, match=r"none of .*'test.jsonl'.* is in the manual directory"):
    rtfds.prepare("math500", data_dir=data_dir / "other", manual_dir=tmp_path / "wrong")
  config = rtfds.MathConfig(name="nofile", files={"test": "nope.jsonl"})
  with pytest.raises(FileNotFoundError, match="split 'test' not found: .*nope.jsonl"):
    rtfds.prepare("math500", data_dir=data_dir / "other", manual_dir=tmp_path / "wrong", config=config)
  with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
    rtfds.prepare("gsm9k", data_dir=data_dir)
  with pytest.raises(ValueError, match="math500: no split 'train'"):
    rtfds.load_records(rtfds.prepare("math500", data_dir=data_dir, manual_dir=FIXTURES / "math500"), "train")


def test_codec_round_trips_or_refuses():
  prompt = [{"role": "user", "content": "1 + 1 = ? 🙂\x00"}]
  example = Example(prompt, " 2 ", {"index": 3, "level": None, "n": [1.5]})
  features = rtfds.encode(example)
  assert (
    features["ground_truth"] == " 2 "
    and rtfds.decode({k: v.encode() for k, v in features.items()}, Example) == example
  )
  with pytest.raises(ValueError, match="row 7: field 'metadata' does not survive JSON"):
    rtfds.encode(Example([], "1", {"pair": (1, 2)}), where="f.jsonl: row 7")
  with pytest.raises(ValueError, match="field 'metadata' cannot be stored as JSON"):
    rtfds.encode(Example([], "1", {"x": float("nan")}))
  with pytest.raises(ValueError, match="field 'ground_truth' must be a string"):
    rtfds.encode(Example([], 1))


def test_command_line_prepares_without_tensorflow(tmp_path, capsys):
  args = [
    "aime2025",
    "--data_dir",
    str(tmp_path),
    "--manual_dir",
    str(FIXTURES / "retool_eval"),
    "--config",
    "eval",
    "--file",
    "test=AIME25.jsonl",
    "--prompt_style",
    "problem",
  ]
  assert main(args) == 0
  out = capsys.readouterr().out.strip().splitlines()[-1]
  assert out == f"{tmp_path}/aime2025/eval/1.0.0 (test: 30)"
  want = load_aime(FIXTURES / "retool_eval" / "AIME25.jsonl", prompt_style="problem")
  assert list(rtfds.load_records(tmp_path / "aime2025" / "eval" / "1.0.0", "test")) == want
  with pytest.raises(SystemExit):
    main(["aime2025", "--data_dir", str(tmp_path), "--config", "raw", "--file", "test=x.jsonl"])
  assert "needs a new --config name" in capsys.readouterr().err
