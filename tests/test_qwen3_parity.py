"""The JAX Qwen3 port computes the same function as Hugging Face `transformers` (PyTorch, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_models import TINY_CONFIGS, save_hf_model
from retool_jax import sharding
from retool_jax.models import qwen3, qwen3_hf
from retool_jax.models.qwen3_hf import hf_tensors

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  hf = save_hf_model(request.param, path)
  return request.param, hf, qwen3_hf.load_hf(path)


def _hf_logits(hf, ids, **kw):
  with torch.no_grad():
    return hf(
      torch.tensor(np.asarray(ids)), **{k: torch.tensor(np.asarray(v)) for k, v in kw.items()}
    ).logits.numpy()


def _random_ids(vocab, shape, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def test_logits_match(pair):
  name, hf, model = pair
  ids = _random_ids(model.config.vocab_size, (2, 13))
  ours = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(ours, _hf_logits(hf, ids), atol=ATOL, rtol=0)
  assert np.abs(ours).max() > 0.5, "logits too small for the comparison to mean anything"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(pair, side):
  name, hf, model = pair
  ids = _random_ids(model.config.vocab_size, (3, 12), seed=1)
  lengths = [12, 7, 3]
  mask = np.zeros_like(ids)
  for b, n in enumerate(lengths):
    if side == "left":
      mask[b, 12 - n :] = 1
    else:
      mask[b, :n] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  ref = _hf_logits(hf, ids, attention_mask=mask, position_ids=positions)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=ATOL, rtol=0)
  # A padded row's real tokens equal the same row run alone without padding.
  row = 1
  alone = _hf_logits(hf, ids[row : row + 1, valid[row]])
  np.testing.assert_allclose(ours[row][valid[row]], alone[0], atol=ATOL, rtol=0)


def test_packed_segments(pair):
  name, hf, model = pair
  seg_lens = [5, 4, 6]
  t = 17  # two padding slots at the end
  ids = _random_ids(model.config.vocab_size, (1, t), seed=2)
  segment_ids = np.zeros((1, t), np.int32)
  start = 0
  for s, n in enumerate(seg_lens, start=1):
    segment_ids[0, start : start + n] = s
    start += n
  ours = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(segment_ids)))
  start = 0
  for n in seg_lens:
    ref = _hf_logits(hf, ids[:, start : start + n])
    np.testing.assert_allclose(ours[:, start : start + n], ref, atol=ATOL, rtol=0)
    start += n


def _nll(logits, targets):
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def _per_expert(tensors):
  """HF keeps MoE experts fused in memory (`experts.gate_up_proj`); the hub layout has one key per expert."""
  out = {}
  for key, value in tensors.items():
    if key.endswith("mlp.experts.gate_up_proj"):
      prefix, inter = key[: -len("gate_up_proj")], value.shape[1] // 2
      for e in range(value.shape[0]):
        out[f"{prefix}{e}.gate_proj.weight"] = value[e, :inter]
        out[f"{prefix}{e}.up_proj.weight"] = value[e, inter:]
    elif key.endswith("mlp.experts.down_proj"):
      prefix = key[: -len("down_proj")]
      for e in range(value.shape[0]):
        out[f"{prefix}{e}.down_proj.weight"] = value[e]
    else:
      out[key] = value
  return out


def test_gradients_match(pair):
  name, hf, model = pair
  ids = _random_ids(model.config.vocab_size, (2, 10), seed=3)
  inputs, targets = ids[:, :-1], ids[:, 1:]
  graphdef, params = nnx.split(model)

  def loss_fn(p):
    return _nll(nnx.merge(graphdef, p)(jnp.asarray(inputs)), jnp.asarray(targets))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  hf.zero_grad()
  logits = hf(torch.tensor(inputs)).logits
  ref_loss = torch.nn.functional.cross_entropy(
    logits.reshape(-1, logits.shape[-1]), torch.tensor(targets, dtype=torch.long).reshape(-1)
  )
  ref_loss.backward()
  np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
  ref_grads = _per_expert({k: p.grad.numpy() for k, p in hf.named_parameters()})
  ours = dict(hf_tensors(grads, model.config))
  assert set(ours) == set(ref_grads)
  for key, g in ours.items():
    ref = ref_grads[key]
    rel = np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1e-12)
    assert rel <= 1e-4, f"{name}: gradient of {key} differs (relative error {rel:.2e})"


@pytest.mark.parametrize("name", [n for n, c in TINY_CONFIGS.items() if c["model_type"] == "qwen3_moe"])
def test_moe_aux_loss_matches(name, tmp_path):
  hf = save_hf_model(name, tmp_path)
  model = qwen3_hf.load_hf(tmp_path)
  ids = _random_ids(model.config.vocab_size, (2, 9), seed=4)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  out = model.forward(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  with torch.no_grad():
    ref = hf(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)),
      output_router_logits=True,
    ).aux_loss
  np.testing.assert_allclose(float(out.router_aux_loss), ref.item(), rtol=1e-5)


def test_scan_layers_same_function(pair):
  name, hf, model = pair
  ids = _random_ids(model.config.vocab_size, (2, 8), seed=5)
  graphdef, state = nnx.split(model)
  scanned = qwen3.Qwen3(model.config.replace(scan_layers=True, remat="full"), rngs=nnx.Rngs(1))
  nnx.update(scanned, state)
  np.testing.assert_allclose(
    np.asarray(scanned(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))), atol=1e-5, rtol=0
  )


def test_sharded_checkpoint_loads_onto_a_mesh(tmp_path):
  """A multi-file checkpoint (index + shards) loads straight into a sharded model with the same logits."""
  hf = save_hf_model("moe_8x2", tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, expert=2)
  model = qwen3_hf.load_hf(tmp_path, mesh=mesh)
  experts = nnx.state(model)["moe_layers"]["mlp"]["gate_proj"][...]
  assert experts.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
  ids = _random_ids(model.config.vocab_size, (2, 7), seed=9)
  with jax.set_mesh(mesh):
    ours = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
  np.testing.assert_allclose(ours, _hf_logits(hf, ids), atol=ATOL, rtol=0)
