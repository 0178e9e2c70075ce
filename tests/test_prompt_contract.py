"""The prompt contract: recorded with a checkpoint, read by the chat, evaluate and the HF export; a tokenizer that
does not fit the model is a one-line error. The last test trains a tiny model and talks to it through stdin."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from retool_jax import evaluate as ev
from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import load_tokenizer, render_ids
from retool_jax.chat.prompt_contract import (
  CONTRACT_FILE,
  ContractError,
  PromptContract,
  TokenizerMismatchError,
  check_tokenizer_fits,
  find_contract,
  load_contract,
  record_contract,
  record_rl_contract,
  record_rollout_contract,
  record_sft_contract,
)
from retool_jax.chat_cli import main, parse_args, settings_from
from retool_jax.checkpoint import save as save_checkpoint
from retool_jax.checkpoint.converters import orbax_to_hf
from retool_jax.checkpoint.hf_export import write_hf
from retool_jax.data.packing import pack_sequences
from retool_jax.demo_task.config import demo_config, rl_config
from retool_jax.demo_task.pipeline import by_hand_commands, next_commands
from retool_jax.demo_task.task import Problem, prompt_ids
from retool_jax.demo_task.teacher import TeacherConfig, teacher_rollouts
from retool_jax.demo_task.tokenizer import build_tokenizer, save_tokenizer
from retool_jax.models.qwen3 import Qwen3
from retool_jax.rollout import MultiTurnConfig
from retool_jax.tools import default_registry
from retool_jax.train import rl_run
from retool_jax.train import state as state_lib
from retool_jax.train.checkpointing import Checkpointer
from retool_jax.train.sft import make_train_step
from scripted_engine import ScriptedEngine
from tiny_qwen3 import tiny_config

REPO = Path(__file__).resolve().parents[1]
DEMO_ROLLOUT = MultiTurnConfig(max_context=128, max_turns=4, max_new_tokens=32, call_formats=("code",))
QUESTION = "Compute 123 * 45."


@pytest.fixture(scope="module")
def demo_tok_dir(tmp_path_factory):
  return Path(save_tokenizer(build_tokenizer(), tmp_path_factory.mktemp("demo_tok") / "tokenizer"))


@pytest.fixture(scope="module")
def demo_tok(demo_tok_dir):
  return load_tokenizer(demo_tok_dir)


@pytest.fixture(scope="module")
def tools():
  return default_registry()


@pytest.fixture(scope="module")
def orbax_run(tmp_path_factory, demo_tok_dir):
  """A run folder: an untrained 128-token model checkpoint plus the demo's contract and tokenizer."""
  run = tmp_path_factory.mktemp("run")
  cfg = tiny_config(max_position_embeddings=128)
  save_checkpoint(run / "checkpoints" / "3", Qwen3(cfg, rngs=nnx.Rngs(0)), cfg)
  record_rollout_contract(run, demo_tok_dir, DEMO_ROLLOUT, tools_in_prompt=False, prompt_style="raw")
  return run


# ---- the file ------------------------------------------------------------------------------------


def test_contract_round_trips_and_resolves_its_tokenizer_next_to_itself(tmp_path, demo_tok_dir):
  written = record_contract(tmp_path / "run", demo_tok_dir, tools_in_prompt=False, call_formats=["code"])
  record = json.loads((tmp_path / "run" / CONTRACT_FILE).read_text())
  assert record["tokenizer"] == "tokenizer" and record["tools_in_prompt"] is False
  assert record["call_formats"] == ["code"] and record["format"].startswith("retool_jax.prompt_contract")
  loaded = load_contract(tmp_path / "run")
  assert loaded == written and loaded.call_formats == ("code",)
  assert loaded.tokenizer_path() == (tmp_path / "run" / "tokenizer").resolve()
  assert (loaded.tokenizer_path() / "tokenizer.json").is_file()  # a copy: the run folder stands alone
  assert load_tokenizer(loaded.tokenizer_path()).encode("<code>") == build_tokenizer().encode("<code>")


def test_found_from_a_step_folder_the_checkpoints_root_or_the_run_folder(orbax_run):
  for path in (orbax_run / "checkpoints" / "3", orbax_run / "checkpoints", orbax_run):
    assert find_contract(path).tools_in_prompt is False
  assert find_contract(orbax_run.parent / "elsewhere") is None


@pytest.mark.parametrize(
  "change, message",
  [
    ({"color": "red"}, r"unknown field\(s\) \['color'\]"),
    ({"call_formats": ["xml"]}, "field 'call_formats' must be"),
    ({"observation_format": "inline"}, "field 'observation_format' must be one of"),
    ({"tools_in_prompt": "no"}, "field 'tools_in_prompt' must be true or false"),
    ({"format": "v0"}, "format is 'v0'"),
  ],
)
def test_bad_fields_are_named_with_the_file(tmp_path, change, message):
  record = PromptContract("tok").to_json() | change
  (tmp_path / CONTRACT_FILE).write_text(json.dumps(record))
  with pytest.raises(ContractError, match=message) as info:
    load_contract(tmp_path)
  assert str(tmp_path / CONTRACT_FILE) in str(info.value)


def test_not_json_and_missing_tokenizer_are_named(tmp_path):
  (tmp_path / CONTRACT_FILE).write_text("{nope")
  with pytest.raises(ContractError, match="not valid JSON"):
    load_contract(tmp_path)
  (tmp_path / CONTRACT_FILE).write_text(json.dumps({"format": PromptContract("t").to_json()["format"]}))
  with pytest.raises(ContractError, match="missing field 'tokenizer'"):
    load_contract(tmp_path)


def test_a_tokenizer_that_does_not_fit_names_both(demo_tok):
  qwen = load_tokenizer(QWEN3_TOKENIZER_DIR)
  check_tokenizer_fits(demo_tok, 128, tokenizer_name="demo", model_name="m")
  check_tokenizer_fits(qwen, 151936, tokenizer_name="qwen", model_name="m")
  with pytest.raises(TokenizerMismatchError, match=r"tokenizer QWEN does not fit model MODEL.*151669 tokens.*128"):
    check_tokenizer_fits(qwen, 128, tokenizer_name="QWEN", model_name="MODEL")
  with pytest.raises(TokenizerMismatchError, match=r"special token\(s\) '<\|endoftext\|>'=\d+"):
    check_tokenizer_fits(demo_tok, 96, tokenizer_name="demo", model_name="m")


def test_hf_export_writes_the_contract_and_tokenizer_beside_the_weights(tmp_path, orbax_run):
  cfg = tiny_config()
  files = write_hf(Qwen3(cfg, rngs=nnx.Rngs(0)), None, tmp_path / "hf", contract=find_contract(orbax_run))
  assert CONTRACT_FILE in files and "tokenizer.json" in files
  record = json.loads((tmp_path / "hf" / CONTRACT_FILE).read_text())
  assert record["tokenizer"] == "." and record["call_formats"] == ["code"] and not record["tools_in_prompt"]
  assert find_contract(tmp_path / "hf").tokenizer_path() == (tmp_path / "hf").resolve()


def test_convert_to_hf_carries_the_recorded_contract(tmp_path, orbax_run):
  orbax_to_hf(orbax_run / "checkpoints", tmp_path / "hf", progress=False)
  contract = find_contract(tmp_path / "hf")
  assert contract.prompt_style == "raw" and contract.tokenizer_path() == (tmp_path / "hf").resolve()
  assert load_tokenizer(tmp_path / "hf").convert_tokens_to_ids("<code>") < 128


def test_trainers_record_what_their_config_says(tmp_path, demo_tok_dir):
  c = rl_run.default_config()
  c.data.tokenizer, c.data.prompt_style, c.tools = str(demo_tok_dir), "raw", "none"
  record_rl_contract(tmp_path / "rl", c, DEMO_ROLLOUT)
  rl = load_contract(tmp_path / "rl")
  assert not rl.tools_in_prompt and rl.call_formats == ("code",) and rl.prompt_style == "raw"
  data = ml_collections.ConfigDict(
    dict(format="retool_sft", style="tool_calls", tokenizer="", enable_thinking=False)
  )
  sft = record_sft_contract(tmp_path / "sft", data)
  assert sft.call_formats == ("tool_call", "code") and not sft.enable_thinking and sft.tools_in_prompt
  assert (tmp_path / "sft" / "tokenizer" / "tokenizer.json").is_file()  # the bundled Qwen3 tokenizer, copied
  data.format = "tokens"
  assert record_sft_contract(tmp_path / "tokens", data) is None


# ---- the chat ------------------------------------------------------------------------------------


class Console:
  def __init__(self, *lines):
    self.lines, self.prompts, self.out = list(lines), [], []

  def ask(self, prompt):
    self.prompts.append(prompt)
    if not self.lines:
      raise EOFError
    return self.lines.pop(0)

  def say(self, text):
    self.out.append(text)


def test_chat_follows_the_contract_no_schemas_retool_observations(orbax_run, demo_tok, tools):
  key = tuple(render_ids(demo_tok, [{"role": "user", "content": QUESTION}]))
  engine = ScriptedEngine(
    demo_tok, {key: ["<code>print(123*45)</code>", "<answer>\\boxed{5535}</answer><|im_end|>"]}
  )
  console = Console(QUESTION, "y", "/exit")
  main(
    ["--checkpoint", str(orbax_run / "checkpoints")], ask=console.ask, say=console.say, engine=engine, tools=tools
  )
  assert (
    console.out[0].startswith(f"prompt contract {orbax_run / CONTRACT_FILE}")
    and "no tool schemas" in console.out[0]
  )
  first, second = (demo_tok.decode(r.prompt_ids) for r in engine.requests)
  assert first == "<|im_start|>user\nCompute 123 * 45.<|im_end|>\n<|im_start|>assistant\n"  # no <tools> block
  assert engine.requests[0].sampling.stop == ("</code>",)
  assert second == first + "<code>print(123*45)</code>\n\n<interpreter>\n5535\n\n</interpreter>\n\n"
  assert "run code_interpreter? [y/N] " in console.prompts
  assert "tool call> code_interpreter(\nprint(123*45)\n)" in console.out
  assert "tool result> 5535\n" in console.out
  assert console.out[-1] == "assistant> <answer>\\boxed{5535}</answer>"


def test_flags_override_the_contract(orbax_run):
  contract = find_contract(orbax_run)
  settings = settings_from(
    parse_args(["--tools-in-prompt", "--call-formats", "tool_call", "--no-thinking"]), contract
  )
  assert settings.tools_in_prompt and settings.call_formats == ("tool_call",) and not settings.enable_thinking
  settings = settings_from(parse_args([]), contract, max_positions=128)
  assert not settings.tools_in_prompt and settings.call_formats == ("code",) and settings.max_context == 128
  assert settings.observation_format == "auto" and settings.enable_thinking


def test_chat_without_a_contract_refuses_a_tokenizer_that_does_not_fit(tmp_path, orbax_run, tools):
  bare = tmp_path / "bare"
  cfg = tiny_config()
  save_checkpoint(bare, Qwen3(cfg, rngs=nnx.Rngs(0)), cfg)
  with pytest.raises(TokenizerMismatchError, match=f"qwen3_tokenizer does not fit model {bare}"):
    main(["--checkpoint", str(bare)], ask=Console().ask, say=Console().say, tools=tools)
  with pytest.raises(TokenizerMismatchError):  # --tokenizer overrides the contract's
    main(
      ["--checkpoint", str(orbax_run / "checkpoints"), "--tokenizer", str(QWEN3_TOKENIZER_DIR)],
      ask=Console().ask,
      say=Console().say,
      tools=tools,
    )
  proc = subprocess.run(
    [sys.executable, "-m", "retool_jax.chat", "--checkpoint", str(bare)],
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    input="",
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().startswith("error: tokenizer ") and str(bare) in proc.stderr


# ---- evaluate and the demo ---------------------------------------------------------------------


def test_evaluate_takes_its_prompt_settings_from_the_contract(orbax_run, demo_tok_dir):
  c = ev.default_config()
  c.model.checkpoint = str(orbax_run / "checkpoints")
  s = ev.prompt_settings(c)
  assert Path(s["tokenizer"]) == (orbax_run / "tokenizer").resolve() and s["prompt_style"] == "raw"
  assert s["tools_in_prompt"] is False and s["rollout"]["call_formats"] == ("code",)
  c.tools_in_prompt, c.data.prompt_style, c.data.tokenizer = True, "retool", str(QWEN3_TOKENIZER_DIR)
  c.rollout = ml_collections.ConfigDict(dict(call_formats=("tool_call",)))
  s = ev.prompt_settings(c)
  assert s["tools_in_prompt"] and s["prompt_style"] == "retool" and s["tokenizer"] == str(QWEN3_TOKENIZER_DIR)
  assert s["rollout"]["call_formats"] == ("tool_call",)
  c = ev.default_config()  # no checkpoint: the Qwen3 defaults
  s = ev.prompt_settings(c)
  assert s["tools_in_prompt"] and s["prompt_style"] == "retool" and s["contract"] is None


def test_evaluate_refuses_a_tokenizer_that_does_not_fit(tmp_path, orbax_run, fixtures_dir):
  c = ev.default_config()
  c.workdir = str(tmp_path / "eval")
  c.model.checkpoint = str(orbax_run / "checkpoints")
  c.data.path = str(fixtures_dir / "gsm8k" / "test.jsonl")
  c.data.tokenizer = str(QWEN3_TOKENIZER_DIR)
  with pytest.raises(TokenizerMismatchError, match=f"does not fit model {orbax_run / 'checkpoints'}"):
    ev.evaluate(c)


def test_demo_prints_commands_for_its_run_folder():
  assert next_commands("runs/demo_cpu") == [
    "python -m retool_jax.chat --checkpoint runs/demo_cpu/rl/checkpoints",
    "python -m retool_jax.evaluate --config=configs/eval_demo.py",
  ]
  assert by_hand_commands("runs/demo_cpu") == [
    "python -m retool_jax.demo_task.data",
    "python -m retool_jax.train --config=configs/demo_sft.py",
    "python -m retool_jax.evaluate --config=configs/eval_demo.py:sft",
    "python -m retool_jax.train --config=configs/demo_rl.py",
  ]
  chat, evaluate = next_commands("/tmp/x")
  assert chat.endswith("--checkpoint /tmp/x/rl/checkpoints") and evaluate.endswith("eval_demo.py:rl,/tmp/x")
  data, sft, _, rl = by_hand_commands("/tmp/x")
  assert (
    data.endswith("--workdir=/tmp/x") and sft.endswith("demo_sft.py:/tmp/x") and rl.endswith("demo_rl.py:/tmp/x")
  )


def test_demo_rl_records_the_demo_contract(tmp_path, demo_tok_dir):
  """The demo's RL run: bare prompts (no tool schemas) although the interpreter runs, ReTool <code> calls; a run
  with the schemas in the prompt records that."""
  c = rl_config(demo_config(str(tmp_path)))
  assert c.tools == "interpreter_stateless" and c.tools_in_prompt is False
  assert c.data.tokenizer == str(tmp_path / "tokenizer")  # written by the data step
  c.data.tokenizer = str(demo_tok_dir)
  record_rl_contract(tmp_path / "rl", c, MultiTurnConfig.from_config(c.rollout))
  rl = load_contract(tmp_path / "rl")
  assert not rl.tools_in_prompt and rl.call_formats == ("code",) and rl.prompt_style == "raw"
  c.tools, c.tools_in_prompt = "interpreter", True
  assert record_rl_contract(tmp_path / "rl_schemas", c, MultiTurnConfig.from_config(c.rollout)).tools_in_prompt


# ---- a trained tiny checkpoint, driven through stdin ---------------------------------------------


def train_tiny_run(run: Path, tok, tok_dir: Path, steps: int = 150) -> float:
  """SFT of a tiny model on one executed demo trajectory (123 * 45); saves it with its contract; final loss."""
  problem = Problem(123, 45)
  [rollout] = asyncio.run(
    teacher_rollouts(tok, [problem], default_registry(), DEMO_ROLLOUT, TeacherConfig(1.0, 0.0), seed=0)
  )
  assert "<interpreter>\n5535\n" in rollout.text and rollout.ids[: rollout.num_prompt_tokens] == prompt_ids(
    tok, problem
  )
  rows = jax.tree.map(
    jnp.asarray, pack_sequences([(rollout.ids, rollout.loss_mask)], 128, pad_id=tok.pad_token_id).tokens
  )
  cfg = tiny_config(max_position_embeddings=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
  tx, schedule = state_lib.make_optimizer({"learning_rate": 3e-3, "schedule": "constant"}, steps)
  state = state_lib.TrainState.create(Qwen3(cfg, rngs=nnx.Rngs(0)), tx, jax.random.key(0))
  step = jax.jit(make_train_step(schedule, grad_accum_steps=1, chunk_size=128), donate_argnums=(0,))
  for _ in range(steps):
    state, metrics = step(state, rows)
  ckpt = Checkpointer(run / "checkpoints", save_every=1, keep=1, async_save=False)
  ckpt.save(state, cfg, force=True)
  ckpt.close()
  record_rollout_contract(run, tok_dir, DEMO_ROLLOUT, tools_in_prompt=False, prompt_style="raw")
  return float(metrics["loss"])


def test_python_m_chat_on_a_trained_checkpoint_runs_the_code_after_asking(tmp_path, demo_tok, demo_tok_dir):
  loss = train_tiny_run(tmp_path / "run", demo_tok, demo_tok_dir)
  assert loss < 0.05, loss
  proc = subprocess.run(
    [sys.executable, "-m", "retool_jax.chat", "--checkpoint", str(tmp_path / "run" / "checkpoints")]
    + ["--temperature", "0"],
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    input=f"{QUESTION}\ny\n/exit\n",
    capture_output=True,
    text=True,
    timeout=300,
  )
  out = proc.stdout
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "no tool schemas in the prompt" in out
  assert "run code_interpreter? [y/N] " in out
  assert "tool call> code_interpreter(\nprint(123*45)\n)" in out
  assert "tool result> 5535\n" in out
  assert "assistant> <answer>\\boxed{5535}</answer>" in out
  assert out.index("run code_interpreter?") < out.index("tool result> 5535") < out.index("assistant> <answer>")
