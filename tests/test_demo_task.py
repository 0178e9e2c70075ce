"""The demo task: its tokenizer keeps the Qwen3 chat format; the teacher's SFT data is really executed; the
demo's phase configs are ordinary trainer configs that read what the data step writes."""

import asyncio
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from retool_jax import evaluate, rewards
from retool_jax.chat import SpecialIds, load_tokenizer, render_ids
from retool_jax.chat.prompt_contract import find_contract
from retool_jax.data import load_math
from retool_jax.demo_task.config import DemoFiles, demo_config, eval_config, model_overrides, rl_config, sft_config
from retool_jax.demo_task.data import prepare, problem_sets
from retool_jax.demo_task.task import Problem, answer_turn, code_turn, make_problems, prompt_ids
from retool_jax.demo_task.teacher import TeacherConfig, TeacherEngine, estimate, slip, teacher_rollouts
from retool_jax.demo_task.tokenizer import TOKENS, VOCAB_SIZE, build_tokenizer, save_tokenizer
from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.rollout import GenerateRequest, MultiTurnConfig, SamplingParams
from retool_jax.tools import default_registry
from retool_jax.train import check_config, sft
from retool_jax.train.rl_config import RLConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MULTITURN = MultiTurnConfig(
  max_context=192, max_turns=4, max_new_tokens=64, call_formats=("code",), enable_thinking=False
)


@pytest.fixture(scope="module")
def tokenizer():
  return build_tokenizer()


def test_tokenizer_round_trips_and_keeps_qwen_markers(tokenizer):
  text = code_turn(Problem(4821, 937)) + "\n\n<interpreter>\n4517277\n</interpreter>\n\n" + answer_turn("4517277")
  ids = tokenizer.encode(text, add_special_tokens=False)
  assert tokenizer.decode(ids) == text
  tokens = tokenizer.convert_ids_to_tokens(ids)
  for tag in ("<code>", "</code>", "<interpreter>", "</interpreter>", "<answer>", "\\boxed{", "<|im_end|>"):
    assert tag in tokens
  special = SpecialIds.from_tokenizer(tokenizer)  # every Qwen3 marker is a single token
  assert tokenizer.eos_token_id == special.im_end
  assert len(set(special.__dict__.values())) == len(special.__dict__)
  assert len(tokenizer) < 128


def test_chat_template_renders_like_qwen3(tokenizer):
  qwen = load_tokenizer(__import__("retool_jax.assets", fromlist=["x"]).QWEN3_TOKENIZER_DIR)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 12 * 34."}]
  for thinking in (True, False):
    ours = tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    theirs = qwen.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    assert ours == theirs
  ids = render_ids(tokenizer, messages[1:], add_generation_prompt=True, enable_thinking=False)
  assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tokenizer_saves_and_loads(tokenizer, tmp_path):
  save_tokenizer(tokenizer, tmp_path / "tok")
  loaded = load_tokenizer(tmp_path / "tok")
  p = make_problems(1, seed=0)[0]
  assert prompt_ids(loaded, p) == prompt_ids(tokenizer, p)
  assert loaded.eos_token_id == tokenizer.eos_token_id


def test_problems_are_distinct_and_respect_exclusions():
  held = make_problems(50, seed=1)
  train = make_problems(500, seed=2, exclude=held)
  assert len(set(train)) == 500 and not set(train) & set(held)
  assert make_problems(50, seed=1) == held
  p = Problem(4821, 937)
  assert p.answer == "4517277" and p.question == "Compute 4821 * 937."
  with pytest.raises(ValueError, match="n >= 1"):
    make_problems(0, seed=0)


def test_slip_changes_exactly_one_digit_and_estimate_is_wrong():
  rng = np.random.default_rng(0)
  for _ in range(200):
    s = slip("4517277", rng)
    assert len(s) == 7 and s[0] != "0" and sum(a != b for a, b in zip(s, "4517277")) == 1
  assert estimate(Problem(4821, 937)) == str(4800 * 937)
  with pytest.raises(ValueError, match="tool_rate"):
    TeacherConfig(tool_rate=1.5)


def test_teacher_trajectories_are_executed_in_the_sandbox(tokenizer):
  problems = make_problems(40, seed=3)
  config = TeacherConfig(tool_rate=0.5, slip_rate=0.0)
  rollouts = asyncio.run(teacher_rollouts(tokenizer, problems, default_registry(), MULTITURN, config, seed=0))
  engine = TeacherEngine(tokenizer, problems, config, seed=0)  # the same per-problem choices
  reward = rewards.get_reward("retool")
  for r, p, uses_tool in zip(rollouts, problems, engine.uses_tool):
    assert r.status == "completed" and r.ids[: r.num_prompt_tokens] == prompt_ids(tokenizer, p)
    assert len(r.ids) == len(r.loss_mask) == len(r.logprobs) <= MULTITURN.max_context
    result = reward(r.text, p.answer, {"num_tool_calls": r.tool_calls})
    assert result.format_ok
    if uses_tool:
      # the interpreter's real output is in the observation (mask 0), and the teacher copied it
      assert r.tool_calls == 1 and f"<interpreter>\n{p.answer}\n" in r.text and result.correct
      obs = [i for i, (m, j) in enumerate(zip(r.loss_mask, r.ids)) if i >= r.num_prompt_tokens and m == 0]
      assert p.answer in tokenizer.decode([r.ids[i] for i in obs])
    else:
      assert r.tool_calls == 0 and not result.correct
  assert 0 < sum(engine.uses_tool) < len(problems)


def test_teacher_slips_make_wrong_copies(tokenizer):
  problems = make_problems(12, seed=4)
  rollouts = asyncio.run(
    teacher_rollouts(
      tokenizer, problems, default_registry(), MULTITURN, TeacherConfig(tool_rate=1.0, slip_rate=1.0), seed=0
    )
  )
  reward = rewards.get_reward("retool")
  for r, p in zip(rollouts, problems):
    result = reward(r.text, p.answer, {"num_tool_calls": r.tool_calls})
    assert r.tool_calls == 1 and not result.correct and result.format_ok
    assert result.reward == pytest.approx(-0.9)  # the ReTool shaping for a wrong answer after one call
  # the slipped digit depends on the trajectory only, not on the order the sandbox returns results in
  engine = TeacherEngine(tokenizer, problems, TeacherConfig(tool_rate=1.0, slip_rate=1.0), seed=0)
  requests = [
    GenerateRequest(
      tuple(tokenizer.encode(f"<interpreter>\n{p.answer}\n</interpreter>")), SamplingParams(), f"{i}-1"
    )
    for i, p in enumerate(problems)
  ]
  forward = asyncio.run(engine.generate(requests))
  backward = asyncio.run(engine.generate(requests[::-1]))[::-1]
  assert [r.output_ids for r in forward] == [r.output_ids for r in backward]
  assert all(tokenizer.decode(r.output_ids) != answer_turn(p.answer) for r, p in zip(forward, problems))


# ---- the demo's configs and data step ---------------------------------------------------------------


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def test_token_ids_without_building_the_tokenizer(tokenizer):
  assert (
    [tokenizer.convert_tokens_to_ids(t) for t in TOKENS]
    == list(range(len(TOKENS)))
    == sorted(tokenizer.get_vocab().values())
  )
  assert len(tokenizer) <= VOCAB_SIZE and VOCAB_SIZE % 64 == 0
  cfg = Qwen3Config(**model_overrides(demo_config()))
  assert (cfg.eos_token_id, cfg.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
  assert cfg.bos_token_id is None and cfg.vocab_size == VOCAB_SIZE


def test_demo_configs_are_trainer_configs():
  demo = load_config("demo_cpu")
  assert demo == demo_config()
  sft_c, rl_c = load_config("demo_sft"), load_config("demo_rl")
  assert check_config(sft_c).__name__ == "retool_jax.train.sft" and sft_c == sft_config(demo)
  assert check_config(rl_c).__name__ == "retool_jax.train.rl_run" and rl_c == rl_config(demo)
  # the old demo's SFT: 6 epochs of 2048 trajectories in batches of 32
  assert sft_c.num_steps == 384 and sft_c.data.format == "tokens" and sft_c.model.dtype == "float32"
  assert rl_c.model.checkpoint == f"{sft_c.workdir}/checkpoints" and rl_c.num_steps == demo.rl_steps
  assert (
    rl_c.tools == "interpreter_stateless" and not rl_c.tools_in_prompt and rl_c.reward == "retool + 0.5 * format"
  )
  rewards.get_reward(rl_c.reward)
  RLConfig.from_config(rl_c.rl)
  MultiTurnConfig.from_config(rl_c.rollout)
  for variant in ("sft", "rl"):
    ev = load_config("eval_demo", variant)
    evaluate.check_config(ev)
    assert ev == eval_config(demo, variant) and ev.model.checkpoint == f"runs/demo_cpu/{variant}/checkpoints"
  # another run folder moves every path with it
  other = load_config("demo_rl", "/tmp/elsewhere")
  assert other.workdir == "/tmp/elsewhere/rl" and other.data.path.startswith("/tmp/elsewhere/")
  assert load_config("eval_demo", "sft,/tmp/elsewhere").data.path == "/tmp/elsewhere/heldout.jsonl"
  with pytest.raises(ValueError, match="unknown variant"):
    load_config("eval_demo", "ppo")


def test_data_step_writes_what_the_phase_configs_read(tmp_path):
  demo = demo_config(str(tmp_path / "run"))
  demo.sft.num_examples, demo.rl_steps, demo.rl.num_prompts, demo.eval.num_problems = 24, 2, 4, 6
  summary = prepare(demo)
  files = DemoFiles(tmp_path / "run")
  assert json.loads(files.data_summary.read_text()) == summary
  assert (summary["sft_examples"], summary["rl_problems"], summary["heldout_problems"]) == (24, 8, 6)
  tok = load_tokenizer(files.tokenizer)
  problems = problem_sets(demo)

  # SFT: the tokens rows pack with the demo tokenizer's padding, every id inside the model's vocabulary
  sft_c = sft_config(demo)
  rows, _ = sft.build_datasets(sft_c.data, sft_c.seed)
  assert rows.examples == tuple((i,) for i in range(24))  # one trajectory per row, every one whole
  ids_BT, segments_BT = rows.tokens.input_ids_BT, rows.tokens.segment_ids_BT
  assert ids_BT.max() < VOCAB_SIZE and (ids_BT[segments_BT == 0] == tok.pad_token_id).all()
  first = json.loads(files.sft_data.read_text().splitlines()[0])
  assert first["input_ids"][: len(prompt_ids(tok, problems["sft"][0]))] == prompt_ids(tok, problems["sft"][0])
  assert "<interpreter>" in tok.decode(first["input_ids"]) or "\\boxed" in tok.decode(first["input_ids"])

  # RL: load_math reads the problems as the bare question, rendered as the teacher's prompts were
  rl_c = rl_config(demo)
  examples = load_math(rl_c.data.path, prompt_style=rl_c.data.prompt_style)
  assert [e.ground_truth for e in examples] == [p.answer for p in problems["rl"]]
  thinking = MultiTurnConfig.from_config(rl_c.rollout).enable_thinking
  assert render_ids(tok, examples[0].prompt, enable_thinking=thinking) == prompt_ids(tok, problems["rl"][0])

  # held-out: disjoint from the training problems; the evaluation reads it
  heldout = load_math(eval_config(demo, "rl").data.path, prompt_style="raw")
  assert [e.ground_truth for e in heldout] == [p.answer for p in problems["heldout"]]
  assert not set(problems["heldout"]) & (set(problems["sft"]) | set(problems["rl"]))

  # the SFT checkpoints (token rows record no prompt format) find the data step's contract above them
  contract = find_contract(files.phase("sft") / "checkpoints")
  assert not contract.tools_in_prompt and contract.call_formats == ("code",) and contract.prompt_style == "raw"
  assert contract.tokenizer_path() == files.tokenizer.resolve()
