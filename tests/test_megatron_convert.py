"""A real Megatron-Core checkpoint converts to the right weights.

Megatron-Core (CPU, gloo) builds a GPTModel with the local layer spec, randomizes it and saves it with
`dist_checkpointing.save`; Megatron itself then reloads that checkpoint into an unsharded model and computes
reference logits. Our converted model must give the same logits. Run as a script, this file is the builder.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow  # Megatron builds its model in gloo subprocesses: ~20-30 s per test on two cores

ATOL = 1e-4
SEQ = 9

DENSE = dict(
  model_type="qwen3",
  vocab_size=100,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  tie_word_embeddings=False,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
)
MOE = dict(
  model_type="qwen3_moe",
  vocab_size=90,
  hidden_size=32,
  intermediate_size=48,
  moe_intermediate_size=24,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=1,
  head_dim=8,
  num_experts=4,
  num_experts_per_tok=2,
  norm_topk_prob=True,
  tie_word_embeddings=True,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
)


# ---- builder (runs in subprocesses: Megatron needs its own torch.distributed world) ---------------
# torch and Megatron are optional (imported where used); JAX is never imported here, as the builder forks.


def _megatron_model(hf: dict, padded_vocab: int):
  import torch  # noqa: PLC0415
  from megatron.core.models.gpt import GPTModel  # noqa: PLC0415
  from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: PLC0415
  from megatron.core.transformer import TransformerConfig  # noqa: PLC0415

  moe = hf["model_type"] == "qwen3_moe"
  extra = (
    dict(
      num_moe_experts=hf["num_experts"],
      moe_router_topk=hf["num_experts_per_tok"],
      moe_ffn_hidden_size=hf["moe_intermediate_size"],
      moe_router_load_balancing_type="none",
      moe_token_dispatcher_type="allgather",
      moe_router_pre_softmax=False,
    )
    if moe
    else {}
  )
  cfg = TransformerConfig(
    num_layers=hf["num_hidden_layers"],
    hidden_size=hf["hidden_size"],
    ffn_hidden_size=hf["intermediate_size"],
    num_attention_heads=hf["num_attention_heads"],
    num_query_groups=hf["num_key_value_heads"],
    kv_channels=hf["head_dim"],
    normalization="RMSNorm",
    layernorm_epsilon=hf["rms_norm_eps"],
    gated_linear_unit=True,
    activation_func=torch.nn.functional.silu,
    add_bias_linear=False,
    qk_layernorm=True,
    use_cpu_initialization=True,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    masked_softmax_fusion=False,
    bias_activation_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
    pipeline_dtype=torch.float32,
    tensor_model_parallel_size=_ps().get_tensor_model_parallel_world_size(),
    pipeline_model_parallel_size=_ps().get_pipeline_model_parallel_world_size(),
    **extra,
  )
  spec = get_gpt_layer_local_spec(num_experts=hf.get("num_experts"), qk_layernorm=True, normalization="RMSNorm")
  return GPTModel(
    cfg,
    spec,
    vocab_size=padded_vocab,
    max_sequence_length=64,
    position_embedding_type="rope",
    rotary_base=int(hf["rope_theta"]),
    share_embeddings_and_output_weights=hf["tie_word_embeddings"],
    pre_process=_ps().is_pipeline_first_stage(),
    post_process=_ps().is_pipeline_last_stage(),
  )


def _ps():
  from megatron.core import parallel_state  # noqa: PLC0415

  return parallel_state


def _init(rank: int, world: int, port: int, tp: int, pp: int):
  import torch  # noqa: PLC0415
  from megatron.core import tensor_parallel  # noqa: PLC0415
  from megatron.core.transformer.moe import moe_utils  # noqa: PLC0415

  torch.cuda.synchronize = lambda *a, **k: None  # CUDA-only calls on Megatron's CPU path
  torch.cuda.current_device = lambda: "cpu"
  moe_utils.te_general_gemm = None  # referenced unguarded when Transformer-Engine is absent
  os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
  torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
  _ps().initialize_model_parallel(tp, pp)
  tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def _save_worker(rank: int, world: int, port: int, job: dict):
  """One rank of a TP x PP job: random weights (norms around 1), saved with `dist_checkpointing.save`."""
  import torch  # noqa: PLC0415
  from megatron.core import dist_checkpointing  # noqa: PLC0415

  _init(rank, world, port, job["tp"], job["pp"])
  torch.manual_seed(100 + rank)
  model = _megatron_model(job["hf"], job["padded_vocab"])
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
  dist_checkpointing.save(model.sharded_state_dict(), job["ckpt"])
  torch.distributed.destroy_process_group()


def _reload_and_forward(port: int, job: dict):
  """Megatron reloads the checkpoint unsharded (world size 1) and computes the reference logits."""
  import torch  # noqa: PLC0415
  from megatron.core import dist_checkpointing  # noqa: PLC0415

  _init(0, 1, port, 1, 1)
  model = _megatron_model(job["hf"], job["padded_vocab"]).eval()
  model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), job["ckpt"]), strict=False)
  ids = torch.tensor(np.asarray(job["ids"]))
  positions = torch.arange(ids.shape[1])[None].expand_as(ids)
  causal = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)[None, None]
  with torch.no_grad():
    np.save(job["out"], model(ids, positions, causal).float().numpy())
  torch.distributed.destroy_process_group()


def _build(job: dict):
  import megatron.core.dist_checkpointing  # noqa: F401, PLC0415  imported once here; forked ranks inherit it
  import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401, PLC0415
  import torch.multiprocessing as mp  # noqa: PLC0415

  world, port = job["tp"] * job["pp"], 20000 + os.getpid() % 20000
  mp.start_processes(_save_worker, args=(world, port, job), nprocs=world, join=True, start_method="fork")
  _reload_and_forward(port + 1, job)


# ---- tests ------------------------------------------------------------------------------------------


def _run_builder(job: dict, timeout=300):
  env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
  proc = subprocess.run(
    [sys.executable, __file__, json.dumps(job)], capture_output=True, text=True, timeout=timeout, env=env
  )
  if proc.returncode:
    raise AssertionError(f"Megatron builder failed:\n{proc.stderr[-4000:]}")


def _megatron_checkpoint(hf: dict, ckpt: Path, tmp: Path, tp: int, pp: int, padded_vocab: int):
  """Saves a random Megatron model at `ckpt`; returns token ids and Megatron's logits for them."""
  ids = np.random.default_rng(0).integers(0, hf["vocab_size"], (2, SEQ)).astype(np.int32)
  out = tmp / "megatron_logits.npy"
  _run_builder(
    dict(tp=tp, pp=pp, hf=hf, padded_vocab=padded_vocab, ckpt=str(ckpt), ids=ids.tolist(), out=str(out))
  )
  return ids, np.load(out)[..., : hf["vocab_size"]]


# The command line, in a process where `import megatron` fails: converting needs torch only.
_CLI_WITHOUT_MEGATRON = (
  "import sys; sys.modules['megatron'] = None; from retool_jax.convert import main; sys.exit(main())"
)


def _convert_and_compare(hf: dict, ckpt_root: Path, tmp: Path, ids: np.ndarray, ref: np.ndarray, cli=False):
  # JAX and retool_jax load in the test process only: this file also runs as the forking builder script.
  import jax.numpy as jnp  # noqa: PLC0415

  from retool_jax import checkpoint  # noqa: PLC0415

  (tmp / "hf_config").mkdir()
  (tmp / "hf_config" / "config.json").write_text(json.dumps(hf))
  if cli:
    args = ["--from", "megatron", "--src", str(ckpt_root), "--hf-config", str(tmp / "hf_config" / "config.json")]
    proc = subprocess.run(
      [sys.executable, "-c", _CLI_WITHOUT_MEGATRON, *args, "--dst", str(tmp / "orbax"), "--no-progress"],
      check=False,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    num_params = int(proc.stdout.split(" parameters")[0].rsplit(" ", 1)[1].replace(",", ""))
  else:
    num_params = checkpoint.megatron_to_orbax(
      ckpt_root, tmp / "hf_config", tmp / "orbax", progress=False
    ).num_params
  model = checkpoint.load(tmp / "orbax")
  assert num_params == model.config.num_params()
  ours = np.asarray(model(jnp.asarray(ids)))
  assert np.abs(ref).max() > 0.5, "logits too small for the comparison to mean anything"
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_tensor_and_pipeline_parallel_dense_checkpoint(tmp_path):
  """TP=2 x PP=2 (4 gloo ranks), untied, vocabulary padded to 128: read back as global tensors by the command
  line, with Megatron not importable (its `common.pt` is never unpickled)."""
  root = tmp_path / "torch_dist"
  iteration = root / "iter_0000020"
  iteration.mkdir(parents=True)
  (root / "latest_checkpointed_iteration.txt").write_text("20")
  ids, ref = _megatron_checkpoint(DENSE, iteration, tmp_path, tp=2, pp=2, padded_vocab=128)
  from retool_jax.checkpoint.megatron import TorchDistReader  # noqa: PLC0415

  reader = TorchDistReader(root)
  assert reader.shape("decoder.layers.self_attention.linear_qkv.weight") == (4, 64, 32)  # stacked, global
  assert reader.shape("embedding.word_embeddings.weight") == (128, 32)
  import torch.distributed.checkpoint as dcp  # noqa: PLC0415

  on_disk = dcp.FileSystemReader(str(iteration)).read_metadata().state_dict_metadata
  assert any("_extra_state" in k for k in on_disk) and (iteration / "common.pt").is_file()  # present, skipped
  _convert_and_compare(DENSE, root, tmp_path, ids, ref, cli=True)


def test_moe_tied_checkpoint(tmp_path):
  """Qwen3-MoE with tied embeddings: router, stacked experts `[layers, experts, ...]`, no output layer."""
  ckpt = tmp_path / "release"
  ckpt.mkdir()
  ids, ref = _megatron_checkpoint(MOE, ckpt, tmp_path, tp=1, pp=1, padded_vocab=96)
  _convert_and_compare(MOE, ckpt, tmp_path, ids, ref)


if __name__ == "__main__":
  _build(json.loads(sys.argv[1]))
