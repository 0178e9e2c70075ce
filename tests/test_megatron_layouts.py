"""Megatron torch_dist layouts written directly with `torch.distributed.checkpoint` (per-layer keys, per-expert
and grouped experts, non-weight entries, optimizer state) and damaged checkpoints."""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from hf_models import save_hf_model
from retool_jax import checkpoint
from retool_jax.checkpoint.megatron import MegatronCheckpointError
from retool_jax.convert import main as convert_main
from retool_jax.models import qwen3_hf
from retool_jax.models.qwen3_hf import hf_tensors
from retool_jax.models.safetensors_io import SafetensorsDir

PAD_ROWS = 6


def _to_megatron(hub: dict, cfg, experts: str) -> dict:
  """The hub tensors in Megatron GPTModel names, per layer (`decoder.layers.N.`), vocabulary padded."""
  t = lambda a: torch.tensor(np.asarray(a))
  pad = lambda a: torch.cat([t(a), torch.zeros(PAD_ROWS, a.shape[1])])
  out = {
    "embedding.word_embeddings.weight": pad(hub["model.embed_tokens.weight"]),
    "decoder.final_layernorm.weight": t(hub["model.norm.weight"]),
  }
  if not cfg.tie_word_embeddings:
    out["output_layer.weight"] = pad(hub["lm_head.weight"])
  g, per, hd = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
  for i in range(cfg.num_hidden_layers):
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    q, k, v = (hub[h + f"self_attn.{n}_proj.weight"] for n in "qkv")
    d = q.shape[1]
    qkv = np.concatenate([q.reshape(g, per, hd, d), k.reshape(g, 1, hd, d), v.reshape(g, 1, hd, d)], axis=1)
    out[m + "self_attention.linear_qkv.weight"] = t(qkv.reshape(-1, d))
    out[m + "input_layernorm.weight"] = t(hub[h + "input_layernorm.weight"])
    out[m + "self_attention.linear_proj.weight"] = t(hub[h + "self_attn.o_proj.weight"])
    out[m + "self_attention.q_layernorm.weight"] = t(hub[h + "self_attn.q_norm.weight"])
    out[m + "self_attention.k_layernorm.weight"] = t(hub[h + "self_attn.k_norm.weight"])
    out[m + "pre_mlp_layernorm.weight"] = t(hub[h + "post_attention_layernorm.weight"])
    if h + "mlp.gate.weight" not in hub:
      out[m + "mlp.linear_fc1.weight"] = t(
        np.concatenate([hub[h + "mlp.gate_proj.weight"], hub[h + "mlp.up_proj.weight"]])
      )
      out[m + "mlp.linear_fc2.weight"] = t(hub[h + "mlp.down_proj.weight"])
      continue
    out[m + "mlp.router.weight"] = t(hub[h + "mlp.gate.weight"])
    for e in range(cfg.num_experts):
      x = f"{h}mlp.experts.{e}."
      fc1 = t(np.concatenate([hub[x + "gate_proj.weight"], hub[x + "up_proj.weight"]]))
      fc2 = t(hub[x + "down_proj.weight"])
      if experts == "local":
        out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1
        out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2
      else:
        out[f"{m}mlp.experts.linear_fc1.weight{e}"] = fc1
        out[f"{m}mlp.experts.linear_fc2.weight{e}"] = fc2
  return out


def _write(state: dict, path):
  path.mkdir(parents=True)
  dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
  (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))


def _hf_case(name, root):
  hf = save_hf_model(name, root / "hf")
  model = qwen3_hf.load_hf(root / "hf")
  return hf, dict(hf_tensors(model, model.config)), model.config


@pytest.mark.parametrize("name, experts", [("moe_mixed_layers", "local"), ("moe_8x2", "grouped")])
def test_layouts_convert_to_hf_logits(name, experts, tmp_path):
  """Per-layer keys; dense and MoE layers mixed; experts per expert or grouped; padded vocabulary."""
  hf, hub, cfg = _hf_case(name, tmp_path)
  _write(_state(hub, cfg, experts), tmp_path / "ckpt" / "iter_0000003")
  (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3\n")
  args = [
    "--from",
    "megatron",
    "--src",
    str(tmp_path / "ckpt"),
    "--hf-config",
    str(tmp_path / "hf" / "config.json"),
  ]
  assert convert_main(args + ["--dst", str(tmp_path / "orbax"), "--no-progress"]) == 0
  model = checkpoint.load(tmp_path / "orbax")
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)


def _state(hub, cfg, experts):
  state = _to_megatron(hub, cfg, experts)
  # Entries that are not weights, as Megatron writes them, and optimizer state.
  state["decoder.layers.0.self_attention.linear_proj._extra_state"] = io.BytesIO(b"te")
  state["rng_state"] = io.BytesIO(b"rng")
  state["optimizer.state.exp_avg.decoder.final_layernorm.weight"] = torch.zeros(cfg.hidden_size)
  return state


def test_qkv_bias_and_exact_weights(tmp_path):
  """q/k/v biases split like the weights; every converted tensor equals the hub tensor exactly."""
  _, hub, cfg = _hf_case("dense_mha4_bias", tmp_path)
  root = tmp_path
  state = _state(hub, cfg, "local")
  g, per, hd = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
  for i in range(cfg.num_hidden_layers):
    h = f"model.layers.{i}.self_attn."
    q, k, v = (hub[h + f"{n}_proj.bias"] for n in "qkv")
    both = np.concatenate([q.reshape(g, per, hd), k.reshape(g, 1, hd), v.reshape(g, 1, hd)], axis=1)
    state[f"decoder.layers.{i}.self_attention.linear_qkv.bias"] = torch.tensor(both.reshape(-1))
    state[f"decoder.layers.{i}.self_attention.linear_proj.bias"] = torch.tensor(np.asarray(hub[h + "o_proj.bias"]))
  _write(state, tmp_path / "release")
  checkpoint.megatron_to_orbax(tmp_path / "release", root / "hf", tmp_path / "orbax", progress=False)
  checkpoint.orbax_to_hf(tmp_path / "orbax", tmp_path / "hf_out", progress=False)
  out = SafetensorsDir(tmp_path / "hf_out")
  assert sorted(out.keys()) == sorted(hub)
  for key, value in hub.items():
    np.testing.assert_array_equal(out.get(key), value, err_msg=key)


# ---- damaged checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  root = tmp_path_factory.mktemp("dense")
  save_hf_model("dense_untied_gqa2", root / "hf")
  model = qwen3_hf.load_hf(root / "hf")
  return root, _to_megatron(dict(hf_tensors(model, model.config)), model.config, "local")


def _convert(ckpt, config, tmp_path):
  return checkpoint.megatron_to_orbax(ckpt, config, tmp_path / "orbax", progress=False)


def test_unknown_tensor(dense, tmp_path):
  root, state = dense
  _write({**state, "decoder.layers.1.self_attention.linear_qkv.lora_a": torch.zeros(2, 2)}, tmp_path / "ckpt")
  with pytest.raises(
    MegatronCheckpointError, match=r"__0_0\.distcp: unknown tensor 'decoder\.layers\.1\..*lora_a'"
  ):
    _convert(tmp_path / "ckpt", root / "hf", tmp_path)
  assert not (tmp_path / "orbax").exists()


def test_config_that_does_not_match(dense, tmp_path):
  root, state = dense
  _write(state, tmp_path / "ckpt")
  config = json.loads((root / "hf" / "config.json").read_text())
  config["num_key_value_heads"] = 1
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"distcp.*'decoder\.layers\.0\.self_attention\.linear_qkv\.weight'"):
    _convert(tmp_path / "ckpt", tmp_path / "config.json", tmp_path)
  assert not (tmp_path / "orbax").exists()


def test_truncated_and_missing_files(dense, tmp_path):
  root, state = dense
  _write(state, tmp_path / "ckpt")
  data = tmp_path / "ckpt" / "__0_0.distcp"
  os.truncate(data, os.path.getsize(data) // 2)
  with pytest.raises(MegatronCheckpointError, match=r"__0_0\.distcp: truncated file: tensor '[^']+'"):
    _convert(tmp_path / "ckpt", root / "hf", tmp_path)
  os.remove(data)
  with pytest.raises(MegatronCheckpointError, match=r"__0_0\.distcp: missing shard file holding tensor"):
    _convert(tmp_path / "ckpt", root / "hf", tmp_path)
  assert not (tmp_path / "orbax").exists()


def test_not_a_torch_dist_checkpoint(dense, tmp_path):
  root, _ = dense
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("7")
  with pytest.raises(MegatronCheckpointError, match="iter_0000007, which does not exist"):
    _convert(tmp_path / "ckpt", root / "hf", tmp_path)
  with pytest.raises(MegatronCheckpointError, match="no .metadata"):
    _convert(tmp_path, root / "hf", tmp_path)
