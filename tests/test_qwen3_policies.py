"""Execution policies (dtype, remat, scan) change how the model runs, not what it computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_models import save_hf_model
from retool_jax.models import qwen3

CFG = qwen3.Qwen3Config(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
)


def _grads(model, ids):
  graphdef, params = nnx.split(model)

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(ids[:, :-1])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1).mean()

  return jax.jit(jax.grad(loss_fn))(params)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_with_no_batch_dims", "attention_out"])
def test_remat_policies_give_the_same_gradients(remat):
  ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 10)).astype(np.int32))
  base = qwen3.Qwen3(CFG, rngs=nnx.Rngs(0))
  other = qwen3.Qwen3(CFG.replace(remat=remat, scan_layers=remat == "full"), rngs=nnx.Rngs(0))
  for a, b in zip(jax.tree.leaves(_grads(other, ids)), jax.tree.leaves(_grads(base, ids))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_bfloat16_tracks_float32_reference(tmp_path):
  hf = save_hf_model("dense_untied_gqa2", tmp_path, seed=1)
  model = qwen3.load_hf(tmp_path, dtype="bfloat16")
  q = nnx.state(model)["dense_layers"]["self_attn"]["q_proj"][...]
  assert q.dtype == jnp.bfloat16
  ids = np.random.default_rng(1).integers(0, 128, (2, 16)).astype(np.int32)
  ours = np.asarray(model(jnp.asarray(ids)))
  assert ours.dtype == np.float32  # logits are always float32
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert rel < 2e-2, f"bfloat16 logits drift {rel:.3e} from the float32 reference"
  grads = _grads(model, jnp.asarray(ids))
  assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in jax.tree.leaves(grads))


def test_config_from_hf_dict_and_presets(tmp_path):
  save_hf_model("moe_mixed_layers", tmp_path)
  cfg = qwen3.Qwen3Config.from_hf(tmp_path)
  assert cfg.layer_kinds == ("dense", "moe", "dense", "moe")
  assert cfg.num_experts == 8 and cfg.tie_word_embeddings
  roundtrip = qwen3.Qwen3Config.from_hf(cfg.to_hf())
  assert roundtrip == cfg
  assert qwen3.preset("4B-2507").rope_theta == 5e6
  assert abs(qwen3.preset("1.7B").num_params() / 1e9 - 1.72) < 0.03
  assert abs(qwen3.preset("30B-A3B").num_params() / 1e9 - 30.5) < 0.3
  assert abs(qwen3.preset("30B-A3B").num_active_params() / 1e9 - 3.3) < 0.3
  with pytest.raises(ValueError, match="model_type"):
    qwen3.Qwen3Config.from_hf({"model_type": "llama"})
  with pytest.raises(ValueError, match="num_key_value_heads"):
    qwen3.Qwen3Config(
      vocab_size=8,
      hidden_size=8,
      intermediate_size=8,
      num_hidden_layers=1,
      num_attention_heads=3,
      num_key_value_heads=2,
      head_dim=4,
    )
  with pytest.raises(ValueError, match="preset"):
    qwen3.preset("7B")
