"""Bad checkpoints fail with an error naming the file and tensor, and never leave a complete-looking output."""

import json
import os
import shutil

import numpy as np
import pytest

from hf_models import save_hf_model
from retool_jax import checkpoint
from retool_jax.checkpoint import converters
from retool_jax.models.safetensors_io import SafetensorsDir, write_file


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "model"
  save_hf_model("dense_untied_gqa2", path)
  return path


def _copy(hf_dir, tmp_path):
  dst = tmp_path / "src"
  shutil.copytree(hf_dir, dst)
  return dst


def _nothing_published(dst):
  parent = os.path.dirname(dst)
  assert not os.path.exists(dst)
  assert not [n for n in os.listdir(parent) if "orbax-checkpoint-tmp" in n or ".partial-" in n]


def test_config_that_does_not_match(hf_dir, tmp_path):
  src = _copy(hf_dir, tmp_path)
  config = json.loads((src / "config.json").read_text())
  config["intermediate_size"] += 8
  (src / "config.json").write_text(json.dumps(config))
  with pytest.raises(converters.ConversionError) as e:
    checkpoint.hf_to_orbax(src, tmp_path / "out", progress=False)
  msg = str(e.value)
  assert "model.safetensors" in msg and "mlp.gate_proj.weight" in msg and "config.json" in msg
  _nothing_published(tmp_path / "out")


def test_missing_shard(hf_dir, tmp_path):
  src = tmp_path / "sharded"
  src.mkdir()
  tensors = SafetensorsDir(hf_dir)
  keys = sorted(tensors.keys())
  halves = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
  for name, part in halves.items():
    write_file(src / name, [(k, np.asarray(tensors.get(k))) for k in part])
  (src / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {k: name for name, part in halves.items() for k in part}})
  )
  shutil.copy(hf_dir / "config.json", src / "config.json")
  os.remove(src / "model-00002-of-00002.safetensors")
  with pytest.raises(ValueError, match="model-00002-of-00002.safetensors.*missing"):
    checkpoint.hf_to_orbax(src, tmp_path / "out", progress=False)
  _nothing_published(tmp_path / "out")


def test_unknown_tensor(hf_dir, tmp_path):
  src = _copy(hf_dir, tmp_path)
  tensors = SafetensorsDir(hf_dir)
  items = [(k, np.asarray(tensors.get(k))) for k in tensors.keys()] + [
    ("model.layers.0.mlp.extra.weight", np.zeros((2, 2), np.float32))
  ]
  write_file(src / "model.safetensors", items)
  with pytest.raises(
    converters.ConversionError, match=r"model\.safetensors.*'model\.layers\.0\.mlp\.extra\.weight'"
  ):
    checkpoint.hf_to_orbax(src, tmp_path / "out", progress=False)
  _nothing_published(tmp_path / "out")


def test_truncated_file(hf_dir, tmp_path):
  src = _copy(hf_dir, tmp_path)
  path = src / "model.safetensors"
  os.truncate(path, os.path.getsize(path) - 1000)
  with pytest.raises(ValueError, match=r"model\.safetensors: truncated file: tensor '[^']+'"):
    checkpoint.hf_to_orbax(src, tmp_path / "out", progress=False)
  _nothing_published(tmp_path / "out")


def test_failure_mid_conversion_publishes_nothing(hf_dir, tmp_path, monkeypatch):
  """A read error after writing has begun leaves neither the destination nor temporary folders."""
  calls = {"n": 0}
  real_get = SafetensorsDir.get
  halfway = len(SafetensorsDir(hf_dir).keys()) // 2  # the up-front checks read shapes, not tensors

  def flaky_get(self, key):
    calls["n"] += 1
    if calls["n"] > halfway:  # in the middle of writing
      raise OSError(f"{self.dir}: disk read failed on {key}")
    return real_get(self, key)

  monkeypatch.setattr(SafetensorsDir, "get", flaky_get)
  with pytest.raises(Exception, match="disk read failed"):
    checkpoint.hf_to_orbax(hf_dir, tmp_path / "out", progress=False)
  _nothing_published(tmp_path / "out")


def test_export_failure_publishes_nothing(hf_dir, tmp_path, monkeypatch):
  checkpoint.hf_to_orbax(hf_dir, tmp_path / "orbax", progress=False)
  real = converters._StoredParam.__getitem__
  calls = {"n": 0}

  def flaky(self, index):
    calls["n"] += 1
    if calls["n"] > 5:
      raise OSError("storage went away")
    return real(self, index)

  monkeypatch.setattr(converters._StoredParam, "__getitem__", flaky)
  with pytest.raises(OSError, match="storage went away"):
    checkpoint.orbax_to_hf(tmp_path / "orbax", tmp_path / "hf_out", progress=False)
  _nothing_published(tmp_path / "hf_out")


def test_existing_destination_is_refused(hf_dir, tmp_path):
  (tmp_path / "out").mkdir()
  with pytest.raises(FileExistsError, match="out"):
    checkpoint.hf_to_orbax(hf_dir, tmp_path / "out", progress=False)
  checkpoint.hf_to_orbax(hf_dir, tmp_path / "orbax", progress=False)
  with pytest.raises(FileExistsError, match="out"):
    checkpoint.orbax_to_hf(tmp_path / "orbax", tmp_path / "out", progress=False)
  assert os.listdir(tmp_path / "out") == []


def test_orbax_checkpoint_that_does_not_match_its_config(hf_dir, tmp_path):
  checkpoint.hf_to_orbax(hf_dir, tmp_path / "orbax", progress=False)
  record_file = tmp_path / "orbax" / checkpoint.CONFIG_ITEM / "metadata"
  record = json.loads(record_file.read_text())
  record["model"]["num_hidden_layers"] = 2
  record_file.write_text(json.dumps(record))
  with pytest.raises(ValueError, match=r"params: parameter dense_layers/.* has shape \(3, .*expects \(2, "):
    checkpoint.load(tmp_path / "orbax")


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty.*not an Orbax checkpoint"):
    checkpoint.load(tmp_path / "empty")
