"""`python -m retool_jax.aot`: the slice-name table, and tiny runs compiled ahead of time for a TPU slice with
libtpu as the compiler (no TPU needed); the 4B and 30B-A3B recipes' checks are slow tests."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from retool_jax import topologies
from retool_jax.programs import Program

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
  not HAS_LIBTPU, reason='libtpu is not installed: the TPU compiler comes with pip install -e ".[aot]"'
)
GiB = 1024**3


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)  # the simulated CPU devices of the other tests are not needed
  return subprocess.run(
    [sys.executable, "-m", "retool_jax.aot", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# ---- the name table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name, topology, chips, hbm_gib",
  [
    ("v4-8", "v4:2x2x1", 4, 32),
    ("v4-16", "v4:2x2x2", 8, 32),
    ("v5p-8", "v5p:2x2x1", 4, 95.74),
    ("v5p-16", "v5p:2x2x2", 8, 95.74),
    ("v5p-64", "v5p:2x4x4", 32, 95.74),
    ("v5p-128", "v5p:4x4x4", 64, 95.74),
    ("v5e-8", "v5e:2x4", 8, 16),
    ("v5e-16", "v5e:4x4", 16, 16),
    ("v6e-8", "v6e:2x4", 8, 32),
    ("v6e-16", "v6e:4x4", 16, 32),
  ],
)
def test_slice_names(name, topology, chips, hbm_gib):
  t = topologies.get(name)
  assert (t.name, t.topology, t.chips) == (name, topology, chips)
  assert t.hbm_bytes_per_chip == pytest.approx(hbm_gib * GiB, rel=1e-3)


def test_libtpu_topology_strings_and_unknown_names():
  t = topologies.get("v5p:2x2x2")
  assert (t.topology, t.chips, t.generation) == ("v5p:2x2x2", 8, "v5p")
  for bad in ("v5p-7", "v9-8", "v5p:2xx2", "v5p:"):
    with pytest.raises(ValueError, match="unknown TPU topology .*known slice names: .*v5p-8"):
      topologies.get(bad)


@needs_libtpu
@pytest.mark.parametrize("name, devices", [("v5p-8", 4), ("v5e-8", 8), ("v6e-8", 8), ("v5p-16", 8)])
def test_slice_devices_from_libtpu(name, devices):
  t = topologies.get(name)
  found = topologies.devices(t)
  assert len(found) == devices and all(d.platform == "tpu" for d in found)
  assert topologies.hbm_bytes_per_device(t, len(found)) == t.hbm_bytes_per_chip


# ---- compiling --------------------------------------------------------------------------------------


@needs_libtpu
def test_rows_and_headroom_of_one_program():
  from retool_jax.aot import compile_program, format_table  # noqa: PLC0415  (defines absl flags at import)

  devices = topologies.devices(topologies.get("v5e-8"))
  mesh = jax.make_mesh((8,), ("x",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.ShapeDtypeStruct((8 * 1024, 1024), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x")))
  program = Program("matmul", jax.jit(lambda a: a @ a.T[:, :1024]), (x,))
  hbm = 16 * GiB
  row = compile_program(program, hbm)
  assert row.status == "ok" and row.argument_bytes == 1024 * 1024 * 4  # one of 8 row shards
  assert row.output_bytes == 1024 * 1024 * 4 and row.flops >= 2 * 1024**3
  assert row.total_bytes >= row.argument_bytes + row.output_bytes and 0.9 < row.headroom < 1.0
  tight = compile_program(program, hbm, min_headroom=1.0)
  assert tight.status == "tight" and "under 100% of HBM left" in tight.message
  assert "| matmul | 0.00 |" in format_table([row]) and "tight: under 100%" in format_table([tight])


@needs_libtpu
def test_sft_programs_fit_a_small_slice():
  from retool_jax.aot import run_programs  # noqa: PLC0415  (defines absl flags at import)

  c = _load("sft_tiny")
  rows, topo = run_programs(c, "v5p-8")
  assert topo.chips == 4
  assert [r.program for r in rows] == ["sft/train_step", "sft/eval_step"]
  assert all(r.status == "ok" and r.temp_bytes > 0 and r.flops > 0 for r in rows), rows
  train, evaluate = rows
  # float32 weights and two AdamW moments, sharded over fsdp=4, are the train step's arguments (plus the batch)
  num_params = 256 * 64 + 2 * (4 * 64 * 16 + 2 * 2 * 64 * 16 + 3 * 64 * 128 + 2 * 64 + 2 * 16) + 64
  state = 3 * 4 * num_params
  assert state / 4 <= train.argument_bytes <= state
  assert train.alias_bytes > 0  # the state is donated
  assert train.flops > 2 * evaluate.flops  # a backward pass


@needs_libtpu
def test_rl_programs_fit_a_small_slice():
  from retool_jax.aot import run_programs  # noqa: PLC0415  (defines absl flags at import)

  c = _load("grpo_tiny")
  c.model.overrides.update(dict(vocab_size=256, hidden_size=64, num_attention_heads=2, head_dim=128))
  c.model.attention_impl = "auto"  # splash attention for the TPU
  c.model.scan_layers = True
  c.rollout.max_context = 256
  c.rl.update(dict(num_prompts=4, group_size=2, num_minibatches=2, micro_batch_size=2, length_multiple=64))
  rows, _ = run_programs(c, "v5p-8")
  names = [r.program for r in rows]
  assert names[:3] == ["rl/policy_logprobs", "rl/reference_logprobs", "rl/policy_update"]
  assert names[3].startswith("engine/prefill[rows=8,t=32,slots=8,cache=48]")
  assert names[4].startswith("engine/decode[slots=8,cache=48")
  assert all(r.status == "ok" for r in rows), rows
  update = rows[2]
  assert update.alias_bytes > 0 and update.flops > rows[0].flops / 2  # half the rows, forward and backward


@needs_libtpu
def test_ppo_critic_programs():
  from retool_jax.aot import run_programs  # noqa: PLC0415  (defines absl flags at import)

  c = _load("ppo_tiny")
  c.model.overrides.update(dict(vocab_size=256, hidden_size=64))
  c.rollout.max_context = 128
  rows, _ = run_programs(c, "v5p-8", only="^ppo/")
  assert [r.program for r in rows] == ["ppo/critic_values", "ppo/critic_update"]
  assert all(r.status == "ok" for r in rows), rows


@needs_libtpu
def test_cli_json_and_listing(tmp_path):
  out = tmp_path / "rows.json"
  done = _cli("--config=configs/sft_tiny.py", "--topology=v5e-8", f"--json={out}", "--only=eval")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| sft/eval_step |" in done.stdout and "every program fits" in done.stdout
  record = json.loads(out.read_text())
  assert record["libtpu_topology"] == "v5e:2x4"
  [row] = record["rows"]
  assert row["program"] == "sft/eval_step" and row["status"] == "ok" and row["hbm_bytes"] == 16 * GiB
  listing = _cli("--config=configs/sft_tiny.py", "--list")
  assert listing.returncode == 0, listing.stderr[-2000:]
  assert "sft/train_step: 48 arrays, largest float32[2, 128, 64]" in listing.stdout  # the stacked MLP weights


@needs_libtpu
def test_oversized_config_exits_non_zero_with_xla_message():
  # xla attention materialises [rows, heads, T, S] float32 scores: 8 rows x 4 heads x 16k x 16k per v5e chip
  done = _cli(
    "--config=configs/sft_tiny.py",
    "--topology=v5e-8",
    "--config.data.seq_len=16384",
    "--config.data.global_batch_size=64",
    "--config.model.attention_impl=xla",
    "--only=eval",
  )
  assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
  assert "| sft/eval_step |" in done.stdout and "oom: " in done.stdout
  assert "DOES NOT FIT with 10% headroom: sft/eval_step (oom)" in done.stderr
  assert "Traceback" not in done.stderr


def test_usage_errors_name_the_problem():
  done = _cli("--config=configs/sft_tiny.py", "--topology=v5p-7")
  assert done.returncode == 2 and "unknown TPU topology 'v5p-7'" in done.stderr
  done = _cli("--config=configs/sft_tiny.py", "--config.trainer=sfx")
  assert done.returncode == 2 and "config.trainer='sfx' is not a registered trainer" in done.stderr


# ---- the recipes at their published sizes (slow) ----------------------------------------------------


# Each 4B program takes 4-20 minutes to compile on 2 cores: the slow suite checks the SFT recipe whole and the
# GRPO recipe's largest training program; `python -m retool_jax.aot` checks the rest (README, "Will it fit?").
@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize(
  "config, only",
  [("retool_qwen3_4b_sft", ""), ("retool_qwen3_4b_rl", "policy_update")],
)
def test_recipe_fits_its_slice(config, only):
  done = _cli(f"--config=configs/{config}.py", "--topology=v5p-8", f"--only={only}", timeout=3600)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  assert "every program fits with at least 10% of HBM free" in done.stdout
