"""Hugging Face <-> Orbax conversion: bit-exact round trips, HF-equal logits, sharded and cast loading, CLI."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx

from hf_models import TINY_CONFIGS, save_hf_model
from retool_jax import checkpoint, sharding
from retool_jax.convert import main as convert_main
from retool_jax.models.safetensors_io import INDEX_FILE, SafetensorsDir

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def converted(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(request.param)
  hf = save_hf_model(request.param, root / "hf")
  checkpoint.hf_to_orbax(root / "hf", root / "orbax", progress=False)
  checkpoint.orbax_to_hf(root / "orbax", root / "hf_again", progress=False)
  return request.param, hf, root


def _hf_logits(hf, ids):
  with torch.no_grad():
    return hf(torch.tensor(ids)).logits.float().numpy()


def _ids(vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=(2, 11)).astype(np.int32)


def test_round_trip_is_bit_exact(converted):
  name, _, root = converted
  src, out = SafetensorsDir(root / "hf"), SafetensorsDir(root / "hf_again")
  assert sorted(out.keys()) == sorted(src.keys())
  for key in src.keys():
    a, b = src.get(key), out.get(key)
    assert a.dtype == b.dtype and a.shape == b.shape, key
    assert a.tobytes() == b.tobytes(), f"{name}: {key} changed in the round trip"
  if TINY_CONFIGS[name]["model_type"] == "qwen3_moe":
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in out.keys()  # hub layout: one key per expert


def test_converted_logits_match_hf(converted):
  name, hf, root = converted
  model = checkpoint.load(root / "orbax")
  ids = _ids(model.config.vocab_size)
  ours = np.asarray(model(jnp.asarray(ids)))
  ref = _hf_logits(hf, ids)
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_export_loads_in_transformers(converted):
  name, hf, root = converted
  config = json.loads((root / "hf_again" / "config.json").read_text())
  assert config["model_type"] == TINY_CONFIGS[name]["model_type"]
  assert (root / "hf_again" / "generation_config.json").exists()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
    root / "hf_again", dtype=torch.float32, attn_implementation="eager"
  ).eval()
  ids = _ids(config["vocab_size"], seed=1)
  np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))


def test_relative_paths_convert_load_and_export(tmp_path, monkeypatch):
  save_hf_model("dense_tied_mqa_hd12", tmp_path / "hf")
  monkeypatch.chdir(tmp_path)  # Orbax itself only takes absolute paths
  checkpoint.hf_to_orbax("hf", "orbax", progress=False)
  model = checkpoint.load("orbax")
  checkpoint.orbax_to_hf("orbax", "hf_again", progress=False)
  ids = jnp.array([[3, 1, 4, 1, 5]])
  np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(checkpoint.load(tmp_path / "orbax")(ids)))
  assert (tmp_path / "hf_again" / "config.json").is_file()


def test_load_onto_mesh_with_cast(tmp_path):
  save_hf_model("moe_8x2", tmp_path / "hf")
  checkpoint.hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", progress=False)
  reference = checkpoint.load(tmp_path / "orbax")
  mesh = sharding.make_mesh(fsdp=2, tensor=2, expert=2)
  model = checkpoint.load(tmp_path / "orbax", mesh=mesh, dtype="bfloat16")
  assert model.config.param_dtype == "bfloat16" and model.config.dtype == "bfloat16"
  state, ref_state = nnx.state(model), nnx.state(reference)
  want = sharding.state_shardings(state, mesh)
  for (path, var), (_, ref), (_, sh) in zip(
    nnx.to_flat_state(state), nnx.to_flat_state(ref_state), nnx.to_flat_state(want)
  ):
    value = var.get_value()
    assert value.dtype == jnp.bfloat16, path
    assert value.sharding.is_equivalent_to(sh.get_value(), value.ndim), path
    np.testing.assert_array_equal(np.asarray(value), np.asarray(ref.get_value()).astype(ml_dtypes.bfloat16))
  assert any(len(v.get_value().sharding.device_set) > 1 for _, v in nnx.to_flat_state(state))


def test_dtype_cast_on_conversion(tmp_path):
  save_hf_model("dense_untied_gqa2", tmp_path / "hf")
  checkpoint.hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype="bfloat16", progress=False)
  assert checkpoint.load(tmp_path / "orbax").config.param_dtype == "bfloat16"
  checkpoint.orbax_to_hf(tmp_path / "orbax", tmp_path / "out", progress=False)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  src, out = SafetensorsDir(tmp_path / "hf"), SafetensorsDir(tmp_path / "out")
  for key in src.keys():
    assert out.get(key).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.get(key), src.get(key).astype(ml_dtypes.bfloat16))
  checkpoint.orbax_to_hf(tmp_path / "orbax", tmp_path / "out32", dtype="float32", progress=False)
  assert SafetensorsDir(tmp_path / "out32").get("lm_head.weight").dtype == np.float32


def test_save_and_checkpoint_manager_layout(tmp_path):
  """`save` writes the layout; a CheckpointManager root with the same items loads its latest step."""
  save_hf_model("dense_tied_mqa_hd12", tmp_path / "hf")
  checkpoint.hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", progress=False)
  model = checkpoint.load(tmp_path / "orbax")
  checkpoint.save(tmp_path / "saved", model, model.config)
  ids = jnp.asarray(_ids(model.config.vocab_size))
  np.testing.assert_array_equal(np.asarray(checkpoint.load(tmp_path / "saved")(ids)), np.asarray(model(ids)))

  record = checkpoint.read_config(tmp_path / "orbax")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.CheckpointManager(tmp_path / "run") as manager:
    for step, scale in ((3, 0.0), (7, 1.0)):
      manager.save(
        step,
        args=ocp.args.Composite(
          **{
            checkpoint.PARAMS_ITEM: ocp.args.StandardSave(jax.tree.map(lambda x: x * scale, params)),
            checkpoint.CONFIG_ITEM: ocp.args.JsonSave(record),
            "opt_state": ocp.args.StandardSave({"count": jnp.array(step)}),
          }
        ),
      )
  latest = checkpoint.load(tmp_path / "run")
  np.testing.assert_array_equal(np.asarray(latest(ids)), np.asarray(model(ids)))


def test_cli_round_trip_with_tokenizer_and_shards(tmp_path, fixtures_dir, capsys):
  save_hf_model("dense_mha4_bias", tmp_path / "hf")
  assert (
    convert_main(
      ["--from", "hf", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "orbax"), "--no-progress"]
    )
    == 0
  )
  assert "Orbax" in capsys.readouterr().out
  assert (
    convert_main(
      [
        "--to",
        "hf",
        "--src",
        str(tmp_path / "orbax"),
        "--dst",
        str(tmp_path / "out"),
        "--tokenizer",
        str(fixtures_dir / "qwen3_tokenizer"),
        "--max-shard-gb",
        "0.00002",
        "--no-progress",
      ]
    )
    == 0
  )
  summary = capsys.readouterr().out
  files = sorted(os.listdir(tmp_path / "out"))
  assert INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 1
  assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= set(files)
  assert "PROVENANCE.txt" not in files
  assert "tensors" in summary and "tokenizer.json" in summary
  src, out = SafetensorsDir(tmp_path / "hf"), SafetensorsDir(tmp_path / "out")
  for key in src.keys():
    assert src.get(key).tobytes() == out.get(key).tobytes()
  transformers.AutoTokenizer.from_pretrained(tmp_path / "out")


def test_cli_argument_errors(capsys):
  with pytest.raises(SystemExit):
    convert_main(["--from", "megatron", "--src", "a", "--dst", "b"])
  assert "--hf-config" in capsys.readouterr().err
  assert convert_main(["--from", "hf", "--src", "/nonexistent/model", "--dst", "/tmp/never", "--no-progress"]) == 1
  assert "/nonexistent/model" in capsys.readouterr().err
