"""Entry point, config checking, metrics files, plots, and an end-to-end SFT run on ReTool-SFT records."""

import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from tensorboardX.proto import event_pb2

from retool_jax import plot
from retool_jax.chat import load_tokenizer
from retool_jax.chat.prompt_contract import find_contract
from retool_jax.train import build, check_config, get_trainer, sft, validate_config
from retool_jax.train.metrics import MetricsWriter, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _load_config(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", ["sft_tiny", "retool_qwen3_4b_sft"])
def test_shipped_configs_match_the_schema(name):
  config = _load_config(name)
  assert check_config(config) is sft


def test_unknown_mistyped_and_missing_fields_are_named():
  config = sft.default_config()
  config.optim.learnin_rate = 1e-3
  with pytest.raises(
    ValueError,
    match=r"config\.optim\.learnin_rate: unknown field; did you mean config\.optim"
    r"\.learning_rate\?",
  ):
    check_config(config)
  # (a config file may build its groups from plain dicts, so the types are checked again)
  raw = sft.default_config().to_dict()
  raw["data"]["seq_len"] = "long"
  with pytest.raises(ValueError, match=r"config\.data\.seq_len: expected int, got str 'long'"):
    check_config(ml_collections.ConfigDict(raw))
  raw = sft.default_config().to_dict()
  raw["log"]["progress"] = 1
  with pytest.raises(ValueError, match=r"config\.log\.progress: expected bool"):
    check_config(ml_collections.ConfigDict(raw))
  config = sft.default_config()
  del config["eval"]
  with pytest.raises(ValueError, match=r"missing field\(s\) config\.eval"):
    check_config(config)
  config = sft.default_config()
  config.optim.learning_rate = 1  # an int where a float is expected is fine
  config.model.overrides = dict(hidden_size=8)  # free-form: checked against Qwen3Config instead
  check_config(config)
  config.model.overrides.hiden_size = 8
  with pytest.raises(
    ValueError, match=r"model.overrides \(Qwen3Config\): unknown field\(s\) \['hiden_size'\].*hidden_size"
  ):
    build.model_config(config.model)
  with pytest.raises(ValueError, match="set model.checkpoint"):
    build.model_config(sft.default_config().model)


def test_trainer_registry():
  assert get_trainer("sft") is sft
  with pytest.raises(ValueError, match=r"config.trainer='ppo2' is not a registered trainer; known: \[.*'sft'.*\]"):
    get_trainer("ppo2")
  with pytest.raises(ValueError, match="unknown field"):
    validate_config(ml_collections.ConfigDict({"a": 1, "b": 2}), ml_collections.ConfigDict({"a": 0}))


def test_command_line_rejects_a_mistyped_override(tmp_path):
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", "retool_jax.train", *args],
    cwd=ROOT,  # noqa: E731
    capture_output=True,
    text=True,
    timeout=120,
  )
  out = run("--config=configs/sft_tiny.py", "--config.optim.lerning_rate=0.1")
  assert out.returncode != 0 and "lerning_rate" in out.stderr
  bad = tmp_path / "bad.py"
  bad.write_text(
    "from retool_jax.train.sft import default_config\n\n"
    "def get_config():\n  c = default_config()\n  c.data.globl_batch_size = 4\n  return c\n"
  )
  out = run(f"--config={bad}")
  assert out.returncode != 0
  assert "config.data.globl_batch_size: unknown field; did you mean config.data.global_batch_size?" in out.stderr


def _events(folder: Path) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in TFRecord event files, read without TensorFlow."""
  out = []
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
      i += 12 + length + 4
      for value in event.summary.value:
        out.append((event.step, value.tag, value.simple_value))
  return out


def test_metrics_writer_truncates_on_resume(tmp_path):
  with MetricsWriter(tmp_path) as w:
    for step in range(1, 6):
      w.write(step, {"loss": 1.0 / step, "perf/step_time_s": 0.1})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # a line cut short by SIGKILL
  with MetricsWriter(tmp_path, resume_step=3) as w:
    w.write(4, {"loss": 0.0, "bad": float("nan")})
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert records[3] == {"step": 4, "bad": "nan", "loss": 0.0}
  scalars = _events(tmp_path / "tensorboard")
  assert (2, "loss", 0.5) in scalars and (4, "loss", 0.0) in scalars
  with pytest.raises(ValueError, match="scalars"):
    MetricsWriter(tmp_path / "x").write(1, {"v": [1.0, 2.0]})


def test_plot_writes_png(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    for step in range(1, 4):
      w.write(step, {"loss": 2.0 / step, "eval_loss": 1.0})
  out = plot.plot_run(tmp_path)
  assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert plot.main([str(tmp_path), "--keys", "nope"]) == 1
  assert plot.main([str(tmp_path / "missing")]) == 1


def _retool_records(n):
  rows = []
  for i in range(n):
    a, b = i + 2, 3 * i + 1
    answer = (
      f"<think>Let me compute {a}*{b} with code.</think>\n<code>\n```python\nprint({a}*{b})\n```\n</code>"
      f"\n<interpreter>\n{a * b}\n</interpreter>\nSo the product is {a * b}.\n"
      f"<answer>\\boxed{{{a * b}}}</answer>"
    )
    rows.append(
      {
        "messages": [
          {"role": "user", "content": f"What is {a} times {b}?"},
          {"role": "assistant", "content": answer},
        ]
      }
    )
  return rows


def test_sft_end_to_end_on_retool_records(tmp_path, fixtures_dir):
  data = tmp_path / "retool_sft.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in _retool_records(12)))
  config = _load_config("sft_tiny")
  config.workdir = str(tmp_path / "run")
  config.num_steps = 3
  config.optim.warmup_steps = 1
  config.model.overrides.vocab_size = 151936
  config.model.overrides.hidden_size = 32
  config.model.overrides.head_dim = 8
  config.data.format = "retool_sft"
  config.data.path = str(data)
  config.data.tokenizer = str(fixtures_dir / "qwen3_tokenizer")
  config.data.eval_holdout = 2
  config.data.seq_len = 128
  config.data.global_batch_size = 8  # one row per simulated device
  config.eval.every_steps = 2
  config.log.progress = False
  check_config(config)

  train_rows, eval_rows = sft.build_datasets(config.data, config.seed)
  assert len(eval_rows) >= 1
  tok = load_tokenizer(config.data.tokenizer)
  trained = tok.decode(train_rows.tokens.targets_BT[0][train_rows.tokens.loss_mask_BT[0] > 0])
  assert "<answer>" in trained and "<interpreter>" not in trained and "What is" not in trained

  last = sft.train(config)
  records = read_metrics(config.workdir)
  assert [r["step"] for r in records] == [1, 2, 3] and last["step"] == 3
  assert all(math.isfinite(r["loss"]) and r["loss_tokens"] > 0 for r in records)
  assert "eval_loss" in records[1] and "eval_loss" in records[2] and "eval_loss" not in records[0]
  assert (Path(config.workdir) / "checkpoints" / "3" / "params").is_dir()
  assert any(tag == "loss" for _, tag, _ in _events(Path(config.workdir) / "tensorboard"))
  contract = find_contract(Path(config.workdir) / "checkpoints" / "3")  # the run's prompt contract
  assert contract.call_formats == ("code",) and contract.tools_in_prompt and contract.tokenizer == "tokenizer"
