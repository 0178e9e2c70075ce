"""Trainers under `jax.distributed` with real processes on this machine (`launch/local_multihost.sh`): 2 processes
x 4 CPU devices train exactly like 1 process x 8 devices, a run killed mid-way resumes exactly, and checkpoints
move between process counts."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from retool_jax.checkpoint import save
from retool_jax.demo_task.task import make_problems
from retool_jax.demo_task.tokenizer import build_tokenizer, save_tokenizer
from retool_jax.models.qwen3 import Qwen3
from retool_jax.train.metrics import read_metrics, without_wall_clock
from tiny_qwen3 import tiny_config
from training_process import wait_for_step

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "local_multihost.sh"
TOL = 1e-5

pytestmark = pytest.mark.slow  # 17 short runs of 1-2 JAX processes: ~12 min in all on two busy shared cores


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
  env.update(
    PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  env.pop("XLA_FLAGS", None)
  return env


def command(processes: int, argv: list[str]) -> list[str]:
  """`argv` (a python module and its flags) on 1 process x 8 devices, or `processes` x 8/processes devices."""
  python = [sys.executable, "-m", *argv]
  if processes == 1:
    return python
  return ["bash", str(LAUNCHER), "--devices-per-process", str(8 // processes), str(processes), "--", *python]


def run(processes: int, argv: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
  env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8") if processes == 1 else env
  r = subprocess.run(command(processes, argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, (
    f"{processes}-process run failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
  )
  return r


def start(processes: int, argv: list[str], env: dict) -> subprocess.Popen:
  env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8") if processes == 1 else env
  return subprocess.Popen(
    command(processes, argv), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )


def children_with_process_id(parent: int, process_id: int) -> list[int]:
  """Processes started by `parent` whose environment says JAX_PROCESS_ID=`process_id`."""
  found = []
  for entry in Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
      environ = (entry / "environ").read_bytes().split(b"\0")
    except (OSError, IndexError, ValueError):
      continue
    if ppid == parent and f"JAX_PROCESS_ID={process_id}".encode() in environ:
      found.append(int(entry.name))
  return found


def kill_one_process_after(proc: subprocess.Popen, metrics: Path, step: int, process_id: int = 1) -> None:
  """SIGKILLs JAX process `process_id` of a launcher once `metrics` shows `step`; the launcher must then stop
  the others and fail."""
  try:
    wait_for_step(metrics, step, proc, timeout=900)
    [pid] = children_with_process_id(proc.pid, process_id)
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode != 0, "the launcher must fail when one of its processes dies"


def kill_after(proc: subprocess.Popen, metrics: Path, step: int) -> None:
  try:
    wait_for_step(metrics, step, proc, timeout=900)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def records(workdir: Path) -> list[dict]:
  return [without_wall_clock(r) for r in read_metrics(workdir)]


def assert_records_close(got: list[dict], want: list[dict]) -> None:
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    assert g.keys() == w.keys(), (g, w)
    for key in w:
      assert np.isclose(g[key], w[key], rtol=TOL, atol=TOL), (g["step"], key, g[key], w[key])


def checkpoint_arrays(workdir: Path, step: int, name: str = "checkpoints") -> dict[str, np.ndarray]:
  """Every array of a saved step (parameters and optimizer state) as numpy, keyed by path, and its JSON record."""
  out = {}
  for item in ("params", "opt_state"):
    path = workdir / name / str(step) / item
    with ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(path).item_metadata.tree
      as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
      tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[f"{item}{jax.tree_util.keystr(key)}"] = np.asarray(leaf)
  record = json.loads((workdir / name / str(step) / "train" / "metadata").read_text())
  return out, record


def assert_checkpoints_equal(a: Path, b: Path, step: int, name: str = "checkpoints") -> None:
  arrays_a, record_a = checkpoint_arrays(a, step, name)
  arrays_b, record_b = checkpoint_arrays(b, step, name)
  assert arrays_a.keys() == arrays_b.keys()
  for key in arrays_a:
    assert arrays_a[key].shape == arrays_b[key].shape and arrays_a[key].dtype == arrays_b[key].dtype, key
    np.testing.assert_allclose(arrays_a[key], arrays_b[key], rtol=TOL, atol=TOL, err_msg=key)
  assert record_a == record_b


# ---- SFT --------------------------------------------------------------------------------------------

SFT_STEPS = 6


def sft_argv(workdir: Path) -> list[str]:
  return [
    "retool_jax.train",
    "--config=configs/sft_tiny.py",
    f"--config.workdir={workdir}",
    f"--config.num_steps={SFT_STEPS}",
    "--config.optim.warmup_steps=2",
    "--config.eval.every_steps=3",
    "--config.checkpoint.every_steps=1",
    "--config.checkpoint.keep=10",
    "--config.log.tensorboard=False",
    "--config.log.progress=False",
  ]


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory, env) -> Path:
  """The reference: the whole SFT run on 1 process x 8 devices."""
  workdir = tmp_path_factory.mktemp("sft_single")
  run(1, sft_argv(workdir), env)
  return workdir


def test_sft_on_two_processes_matches_one_process(sft_single, tmp_path, env):
  workdir = tmp_path / "two"
  out = run(2, sft_argv(workdir), env)
  assert "[p0] " in out.stdout + out.stderr and "[p1] " in out.stdout + out.stderr  # prefixed output
  want = records(sft_single)
  assert [r["step"] for r in want] == list(range(1, SFT_STEPS + 1))
  assert_records_close(records(workdir), want)
  assert_checkpoints_equal(workdir, sft_single, SFT_STEPS)
  assert not (workdir / "metrics.jsonl.1").exists()


def test_sft_killed_process_then_restart_resumes_exactly_and_checkpoints_move_between_process_counts(
  sft_single, tmp_path, env
):
  killed = tmp_path / "killed"
  kill_one_process_after(start(2, sft_argv(killed), env), killed / "metrics.jsonl", 3)
  saved = [int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and max(saved) < SFT_STEPS  # stopped mid-run, with whole checkpoints only
  moved = tmp_path / "two_to_one"
  shutil.copytree(killed, moved)

  run(2, sft_argv(killed), env)  # both processes restarted: resume from the 2-process checkpoint
  assert_records_close(records(killed), records(sft_single))
  assert_checkpoints_equal(killed, sft_single, SFT_STEPS)

  run(1, sft_argv(moved), env)  # written by 2 processes, restored by 1
  assert_records_close(records(moved), records(sft_single))
  assert_checkpoints_equal(moved, sft_single, SFT_STEPS)

  one = tmp_path / "one_to_two"
  kill_after(start(1, sft_argv(one), env), one / "metrics.jsonl", 3)
  assert max(int(p.name) for p in (one / "checkpoints").iterdir() if p.name.isdigit()) < SFT_STEPS
  run(2, sft_argv(one), env)  # written by 1 process, restored by 2
  assert_records_close(records(one), records(sft_single))
  assert_checkpoints_equal(one, sft_single, SFT_STEPS)


# ---- GRPO ---------------------------------------------------------------------------------------------

GRPO_STEPS = 3

# A reward a tiny random policy's samples differ on (so advantages and updates are not zero): the share of '7's.
REWARD_MODULE = '''
def sevens(response, ground_truth, info):
  text = response.replace("<|im_end|>", "")
  return text.count("7") / max(len(text), 1)
'''

GRPO_CONFIG = '''
import ml_collections
from retool_jax.train.rl_run import default_config


def get_config():
  c = default_config()
  c.num_steps = {num_steps}
  c.model.overrides = ml_collections.ConfigDict(dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128,
    eos_token_id={eos}))
  c.model.dtype = "float32"
  c.data.path = "{data}"
  c.data.tokenizer = "{tokenizer}"
  c.data.prompt_style = "problem"
  c.reward = "mp_reward:sevens"
  c.tools = "none"
  c.rollout = ml_collections.ConfigDict(dict(
    max_context=96, max_turns=1, max_new_tokens=12, call_formats=("code",), enable_thinking=False))
  c.rl = ml_collections.ConfigDict(dict(
    algorithm="grpo", num_prompts=4, group_size=2, num_minibatches=2, length_multiple=32,
    loss=dict(kl_coef=0.05, entropy_coef=0.01)))
  c.engine.max_batch_size = 8
  c.optim.learning_rate = 3e-3  # Adam turns float noise in near-zero gradients into steps of about lr
  c.checkpoint.every_steps = 1
  c.log.tensorboard = False
  c.log.progress = False
  return c
'''


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory, env) -> tuple[Path, dict]:
  root = tmp_path_factory.mktemp("grpo")
  tokenizer = build_tokenizer()
  save_tokenizer(tokenizer, root / "tokenizer")
  with open(root / "problems.jsonl", "w") as f:
    for p in make_problems(16, seed=0):
      f.write(json.dumps({"problem": p.question, "answer": p.answer}) + "\n")
  (root / "mp_reward.py").write_text(REWARD_MODULE)
  config = GRPO_CONFIG.format(
    num_steps=GRPO_STEPS, eos=tokenizer.eos_token_id, data=root / "problems.jsonl", tokenizer=root / "tokenizer"
  )
  (root / "grpo_config.py").write_text(config)
  return root, dict(env, PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], str(root)]))


def grpo_argv(root: Path, workdir: Path) -> list[str]:
  return ["retool_jax.train", f"--config={root / 'grpo_config.py'}", f"--config.workdir={workdir}"]


def test_grpo_with_an_engine_per_process_matches_one_process(grpo_setup, tmp_path):
  root, env = grpo_setup
  single, two = tmp_path / "single", tmp_path / "two"
  run(1, grpo_argv(root, single), env)
  run(2, grpo_argv(root, two), env)
  want = records(single)
  assert [r["step"] for r in want] == list(range(1, GRPO_STEPS + 1))
  assert len({r["reward_mean"] for r in want}) > 1 and all(r["grad_norm"] > 0 for r in want)  # a real signal
  assert_records_close(records(two), want)
  assert_checkpoints_equal(two, single, GRPO_STEPS)


# ---- DPO ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("dpo")
  cfg = tiny_config()
  save(root / "policy", Qwen3(cfg, rngs=nnx.Rngs(0)), cfg)
  build_tokenizer().save_pretrained(root / "tokenizer")
  with open(root / "pairs.jsonl", "w") as f:
    for a in range(16):
      row = {
        "prompt": f"What is {a} + {a + 3}?",
        "chosen": f"Using the interpreter: {a} + {a + 3} = \\boxed{{{2 * a + 3}}}",
        "rejected": "I cannot compute that." + " Sorry." * (a % 3),
      }
      f.write(json.dumps(row) + "\n")
  return root


def dpo_argv(root: Path, workdir: Path) -> list[str]:
  return [
    "retool_jax.train",
    "--config=configs/dpo_tools.py",
    f"--config.workdir={workdir}",
    f"--config.model.checkpoint={root / 'policy'}",
    "--config.model.dtype=float32",
    f"--config.data.path={root / 'pairs.jsonl'}",
    f"--config.data.tokenizer={root / 'tokenizer'}",
    "--config.data.enable_thinking=False",
    "--config.batch_size=8",
    "--config.num_epochs=2",
    "--config.optim.learning_rate=5e-3",
    "--config.optim.warmup_steps=1",
    "--config.checkpoint.every_steps=1",
    "--config.log.tensorboard=False",
    "--config.log.progress=False",
  ]


def test_dpo_on_two_processes_matches_one_process(dpo_setup, tmp_path, env):
  single, two = tmp_path / "single", tmp_path / "two"
  run(1, dpo_argv(dpo_setup, single), env)
  run(2, dpo_argv(dpo_setup, two), env)
  want = records(single)
  assert [r["step"] for r in want] == [1, 2, 3, 4]  # 16 pairs, 8 a batch, 2 epochs
  assert want[-1]["loss"] < want[0]["loss"] and want[-1]["reward_accuracy"] == 1.0
  got = records(two)
  for g, w in zip(got, want):
    # while the policy is still the reference, each pair's margin is float rounding and `reward_accuracy`
    # (the share of margins > 0) counts the signs of rounding errors: compared only once margins are real
    if abs(w["reward_margin"]) < TOL:
      assert abs(g["reward_margin"]) < TOL
      del g["reward_accuracy"], w["reward_accuracy"]
  assert_records_close(got, want)
  assert_checkpoints_equal(two, single, 4)
