"""Execution policies (dtype, remat, scan) change how the model runs, not what it computes."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_models import save_hf_model
from retool_jax.models import qwen3, qwen3_hf
from retool_jax.models.logprobs import token_logprobs

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
  model = qwen3_hf.load_hf(tmp_path, dtype="bfloat16")
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


# Published sizes (Qwen3 model cards): total and non-embedding parameters in billions, as the cards round them.
PUBLISHED = {
  "0.6B": (0.6, 0.44),
  "1.7B": (1.7, 1.4),
  "4B": (4.0, 3.6),
  "8B": (8.2, 6.95),
  "14B": (14.8, 13.2),
  "32B": (32.8, 31.2),
  "30B-A3B": (30.5, 29.9),
  "235B-A22B": (235, 234),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_sizes(name):
  cfg = qwen3.preset(name)
  total, non_embedding = PUBLISHED[name]
  embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
  assert cfg.vocab_size == 151936 and cfg.head_dim == 128 and cfg.rope_theta == 1e6
  assert abs(cfg.num_params() / 1e9 - total) / total < 0.02
  assert abs((cfg.num_params() - embeddings) / 1e9 - non_embedding) / non_embedding < 0.02
  assert cfg.tie_word_embeddings == (name in ("0.6B", "1.7B", "4B"))
  if cfg.is_moe:  # the activated count on the cards includes the embeddings
    active = (cfg.num_active_params() + cfg.vocab_size * cfg.hidden_size) / 1e9
    assert abs(active - {"30B-A3B": 3.3, "235B-A22B": 22}[name]) / active < 0.03
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (128, 8, True)


def test_fused_attention_branch_computes_causal_gqa_attention(monkeypatch):
  """`attention_impl="cudnn"` (GPU only) hands q/k/v to `jax.nn.dot_product_attention`; run here with XLA's
  implementation of the same call, it gives the same logits and gradients as the default attention."""
  calls = []
  real = jax.nn.dot_product_attention

  def portable(q, k, v, *, is_causal, implementation):
    calls.append((q.shape, k.shape, implementation))
    return real(q, k, v, is_causal=is_causal, implementation=None)

  monkeypatch.setattr(jax.nn, "dot_product_attention", portable)
  cfg = CFG.replace(num_hidden_layers=1)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32))

  def logits_and_grads(impl):
    graphdef, params = nnx.split(qwen3.Qwen3(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0)))

    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(ids[:, :-1])
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1).mean(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return logits, grads

  (fused, fused_grads), (base, base_grads) = logits_and_grads("cudnn"), logits_and_grads("xla")
  np.testing.assert_allclose(np.asarray(fused), np.asarray(base), atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(base_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  assert calls == [((2, 8, 4, 8), (2, 8, 2, 8), "cudnn")]  # [B, T, heads, head_dim], GQA keys
  model = qwen3.Qwen3(cfg.replace(attention_impl="cudnn"), rngs=nnx.Rngs(0))
  jax.make_jaxpr(lambda x: model(x, attention_mask=jnp.ones_like(x)))(ids)
  assert len(calls) == 1  # padding or packing masks take the portable path


def test_benchmark_flop_count_matches_xla():
  """bench/model_step.py's MFU numerator: its FLOPs per token equal XLA's count for a train step, tied or not
  (XLA computes the masked half of causal attention too, hence the added term)."""
  path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "model_step.py"
  spec = importlib.util.spec_from_file_location("model_step_bench", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)

  b, t = 2, 64
  ids = jnp.zeros((b, t + 1), jnp.int32)

  def xla_flops_per_token(cfg):
    graphdef, params = nnx.split(qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))

    def loss(p):
      return -token_logprobs(nnx.merge(graphdef, p), ids[:, :-1], ids[:, 1:], chunk_size=t).logprobs_BT.mean()

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / (b * t)

  for tied in (True, False):
    cfg = CFG.replace(
      vocab_size=512,
      hidden_size=128,
      intermediate_size=256,
      head_dim=32,
      num_hidden_layers=1,
      tie_word_embeddings=tied,
    )
    xla = xla_flops_per_token(cfg)
    masked_half = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * t
    ours = bench.train_flops_per_token(cfg, t) + masked_half
    assert abs(xla / ours - 1) < 0.03, (tied, xla, ours)
