"""RL runs from a config: the prompt pipeline resumes in place, and a run killed with SIGKILL at a random moment
and started again logs exactly the metrics of an uninterrupted run (policy, optimizer, critic, reference,
prompt position and sampling seeds all restored), also with multi-turn rollouts that call the sandboxed
interpreter (tool results arrive in any order, the embedded engine's rows must not depend on it)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from retool_jax.data.records import Example
from retool_jax.demo_task.task import make_problems
from retool_jax.demo_task.tokenizer import build_tokenizer, save_tokenizer
from retool_jax.train.metrics import read_metrics, without_wall_clock
from retool_jax.train.rl_run import prompt_pipeline
from training_process import sigkill_after_step

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 14
# What the sampled tokens alone decide. With tool calls, rows reach the engine whenever their tool returns, and
# XLA's CPU matmuls round a row differently with the shape of the call it is packed into (the prefill's rows and
# chunk), so engine log-probs (and what the update computes from them) agree to the last bits only.
TOKEN_METRICS = (
  "step", "batch_size", "sampling_rounds", "reward_mean", "reward_std", "train_reward_mean", "accuracy", "format_ok",
  "tool_calls_per_traj", "tool_use_rate", "tool_error_rate", "response_length", "response_length_max",
  "truncation_rate", "abort_rate",
)  # fmt: skip

# Rewards a tiny random policy can climb and that differ between samples: the share of '7' characters; code
# blocks opened, closed and answered by the interpreter (the demo tokenizer's `<code>` and `</code>` are single
# tokens, so a random policy writes some; the sandbox runs whatever they hold, errors are observations too).
REWARD_MODULE = '''
def sevens(response, ground_truth, info):
  text = response.replace("<|im_end|>", "")
  return text.count("7") / max(len(text), 1)


def code_calls(response, ground_truth, info):
  return sum(response.count(tag) for tag in ("<code>", "</code>", "<interpreter>")) / 4
'''

CONFIG = '''
import ml_collections
from retool_jax.train.rl_run import default_config


def get_config(arg="grpo"):
  algorithm, _, staleness = arg.partition(",")
  c = default_config()
  c.workdir = "{workdir}"
  c.num_steps = {num_steps}
  c.model.overrides = ml_collections.ConfigDict(dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128,
    eos_token_id={eos}))
  c.model.dtype = "float32"
  c.data.path = "{data}"
  c.data.tokenizer = "{tokenizer}"
  c.data.prompt_style = "problem"
  c.reward = "rl_resume_reward:sevens"
  c.tools = "none"
  c.rollout = ml_collections.ConfigDict(dict(
    max_context=96, max_turns=1, max_new_tokens=12, call_formats=("code",), enable_thinking=False))
  num_prompts = 2
  if "{tools}" == "interpreter":  # the sandbox runs the calls; no schemas in the character-level prompts
    c.model.overrides.max_position_embeddings = 256
    c.reward = "rl_resume_reward:code_calls"
    c.tools = "interpreter"
    c.tools_in_prompt = False
    c.rollout = ml_collections.ConfigDict(dict(
      max_context=224, max_turns=3, max_new_tokens=32, max_observation_tokens=48, call_formats=("code",),
      enable_thinking=False))
    num_prompts = 4
  rl = dict(algorithm=algorithm, num_prompts=num_prompts, group_size=4, num_minibatches=2, length_multiple=32,
            max_staleness=int(staleness or 0))
  if algorithm == "ppo":
    rl.update(kl_reward_coef=0.05, lam=0.95)
  else:
    rl.update(loss=dict(kl_coef=0.05, tis_cap=2.0, entropy_coef=0.01))
  c.rl = ml_collections.ConfigDict(rl)
  c.engine.max_batch_size = 8
  c.optim.learning_rate = 3e-2
  c.critic.optim.learning_rate = 1e-2
  c.checkpoint.every_steps = 2
  c.log.tensorboard = False
  c.log.progress = False
  return c
'''


def _examples(n: int) -> list[Example]:
  return [Example(prompt=[{"role": "user", "content": str(i)}], ground_truth=str(i)) for i in range(n)]


def test_prompt_pipeline_resumes_in_place():
  examples = _examples(5)

  def hosts():
    return [prompt_pipeline(examples, num_prompts=2, seed=3, process_index=h, process_count=2) for h in range(2)]

  def draw(pipes):
    return [item["answer"] for p in pipes for item in next(p).examples]

  straight = hosts()
  drawn = [draw(straight) for _ in range(9)]  # 18 prompts: 3 passes and a bit
  flat = [answer for answers in drawn for answer in answers]
  assert sorted(flat[:5]) == sorted(flat[5:10]) == [str(i) for i in range(5)]  # every pass covers all
  assert flat[:5] != flat[5:10]  # a fresh shuffle per pass
  for start in (0, 2, 5, 7):
    first = hosts()
    for _ in range(start):
      draw(first)
    saved = first[0].state()  # what a checkpoint holds (the same on every host)
    assert saved == first[1].state() and saved["position"] == 2 * start % 5
    resumed = hosts()
    for p in resumed:
      p.restore(saved)
    assert [draw(resumed) for _ in range(9 - start)] == drawn[start:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, dict]:
  root = tmp_path_factory.mktemp("rl_resume")
  tokenizer = build_tokenizer()
  save_tokenizer(tokenizer, root / "tokenizer")
  with open(root / "problems.jsonl", "w") as f:
    for p in make_problems(40, seed=0):
      f.write(json.dumps({"problem": p.question, "answer": p.answer}) + "\n")
  (root / "rl_resume_reward.py").write_text(REWARD_MODULE)
  env = dict(os.environ)
  env.update(
    PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]),
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  return root, env | {"RL_RESUME_EOS": str(tokenizer.eos_token_id)}


def _command(
  root: Path,
  workdir: Path,
  algorithm: str,
  eos: str,
  tools: str = "none",
  steps: int = NUM_STEPS,
  staleness: int = 0,
):
  config = root / f"config_{workdir.name}.py"
  config.write_text(
    CONFIG.format(
      workdir=workdir,
      num_steps=steps,
      eos=eos,
      data=root / "problems.jsonl",
      tokenizer=root / "tokenizer",
      tools=tools,
    )
  )
  return [sys.executable, "-m", "retool_jax.train", f"--config={config}:{algorithm},{staleness}"]


@pytest.mark.slow  # three short RL runs in subprocesses (mostly XLA compilation)
@pytest.mark.parametrize(
  "algorithm,tools,steps", [("grpo", "none", NUM_STEPS), ("ppo", "none", NUM_STEPS), ("grpo", "interpreter", 6)]
)
def test_sigkill_then_resume_matches_uninterrupted_run(setup, algorithm, tools, steps):
  root, env = setup
  eos = env["RL_RESUME_EOS"]
  name = f"{algorithm}_{tools}"
  straight = root / f"straight_{name}"
  done = subprocess.run(
    _command(root, straight, algorithm, eos, tools, steps), cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr
  expected = read_metrics(straight)
  assert [r["step"] for r in expected] == list(range(1, steps + 1))
  assert len({r["reward_mean"] for r in expected}) > 1 and any(r["grad_norm"] > 0 for r in expected)  # it learns
  if tools == "interpreter":  # the sandbox ran code (and its results were fed back) in most steps
    assert sum(r["tool_calls_per_traj"] > 0 for r in expected) >= steps // 2, [
      r["tool_calls_per_traj"] for r in expected
    ]

  killed = root / f"killed_{name}"
  command = _command(root, killed, algorithm, eos, tools, steps)
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  # a random moment after a random step (in a rollout, an update, a checkpoint save, ...)
  after, delay = random.randint(2, min(6, steps - 2)), random.uniform(0.0, 0.1)
  moment = f"killed {delay:.3f}s after step {after}"
  sigkill_after_step(proc, killed / "metrics.jsonl", after, delay)
  partial = read_metrics(killed)
  assert after <= partial[-1]["step"] < steps, f"not {moment}"

  resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr
  got = read_metrics(killed)
  assert [r["step"] for r in got] == list(range(1, steps + 1))
  got, expected = [without_wall_clock(r) for r in got], [without_wall_clock(r) for r in expected]
  if tools == "none":  # every step's rows reach the engine together: both runs decode the same batches
    assert got == expected, moment
  else:
    assert [{k: r.get(k) for k in TOKEN_METRICS} for r in got] == [
      {k: r.get(k) for k in TOKEN_METRICS} for r in expected
    ], moment
    assert got == [pytest.approx(r, rel=1e-4, abs=1e-6) for r in expected], moment
  saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == steps
  if algorithm == "ppo":
    assert (killed / "critic_checkpoints" / str(steps)).is_dir()


@pytest.mark.slow  # two short asynchronous RL runs in subprocesses
def test_an_async_run_killed_with_sigkill_resumes_and_counts_the_batches_it_samples_again(setup):
  root, env = setup
  steps, staleness = 8, 1
  killed = root / "killed_async"
  command = _command(root, killed, "grpo", env["RL_RESUME_EOS"], steps=steps, staleness=staleness)
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  sigkill_after_step(proc, killed / "metrics.jsonl", 5, random.uniform(0.0, 0.1))  # saved at step 4
  before = {r["step"]: r for r in read_metrics(killed)}
  assert 5 <= max(before) < steps
  resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr
  got = read_metrics(killed)
  assert [r["step"] for r in got] == list(range(1, steps + 1))
  # the run resumed from the checkpoint of step 4, or of step 2 if the kill came before step 4's (asynchronous)
  # save was committed: what a committed checkpoint holds is kept, the rest is redone
  assert got[:2] == [before[1], before[2]]
  for r in got:
    assert r["async/staleness_max"] <= staleness and r["async/dropped_batches"] == 0
  # the producer had read ahead of the saved step: those batches were sampled again and counted
  replayed = [r["async/replayed_batches"] for r in got]
  assert replayed[:2] == [0, 0] and all(n >= 1 for n in replayed[4:]), replayed
  record = json.loads((killed / "checkpoints" / str(steps) / "train" / "metadata").read_text())
  assert record["data"]["prompts_used"] == steps * 2  # every prompt trained on once, none skipped or doubled
