"""Every attention implementation computes what the `xla` reference computes, outputs and gradients, on the
masks the project builds (packed, left- and right-padded rows, prefill and decode over a KV cache); the
blockwise path never builds a `[T, S]` array; splash runs in the Pallas interpreter here and compiles for TPU."""

import importlib.util
import math
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import topologies

from retool_jax import sharding as sh
from retool_jax.models import attention, qwen3
from retool_jax.models.attention import AttentionMask, SelfAttentionMask, attend, causal_mask

B = 2


def _qkv(t, s, n, k, h=8, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, t, n, h))
  kk, v = rng.normal(size=(B, s, k, h)), rng.normal(size=(B, s, k, h))
  return tuple(jnp.asarray(x, dtype) for x in (q, kk, v))


def _packed(t):
  cut = t // 3
  return causal_mask((B, t), segment_ids_BT=jnp.asarray([[1] * cut + [2] * (t - cut - 2) + [0] * 2, [1] * t]))


def _padded(t, side):
  real = np.ones((B, t), np.int32)
  if side == "left":
    real[0, :5], real[1, :2] = 0, 0
  else:
    real[0, -5:], real[1, -1:] = 0, 0
  return causal_mask((B, t), attention_mask_BT=jnp.asarray(real))


def _prefill(t, s):
  """T new tokens written at column 11 of an S-slot cache; row 0 had 3 left-padding slots, row 1 pads its
  first two new tokens (what `Qwen3.forward_cached` builds)."""
  written = np.zeros((B, s), np.int32)
  written[0, 3:11], written[1, :11] = 1, 1
  new = np.ones((B, t), np.int32)
  new[1, :2] = 0
  written[:, 11 : 11 + t] = new
  return AttentionMask(
    jnp.asarray(new), jnp.asarray(written), jnp.broadcast_to(11 + jnp.arange(t, dtype=jnp.int32), (B, t))
  )


def _decode(s):
  """One token per row at its own cache column (rows of different lengths in one batch)."""
  col = np.array([6, s - 9])
  written = (np.arange(s)[None, :] <= col[:, None]).astype(np.int32)
  written[0, :2] = 0  # left padding
  return AttentionMask(jnp.ones((B, 1), jnp.int32), jnp.asarray(written), jnp.asarray(col[:, None], jnp.int32))


def _out_and_grads(impl, q, k, v, mask, **kw):
  def loss(q, k, v):
    o = attend(q, k, v, mask, impl=impl, **kw)
    return jnp.sum(o * jnp.cos(o)), o  # a non-linear readout so every output element has its own cotangent

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_same(impl, q, k, v, mask, atol=1e-5, **kw):
  out, grads = _out_and_grads(impl, q, k, v, mask, **kw)
  ref, ref_grads = _out_and_grads("xla", q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=atol, rtol=0)
  for name, a, b in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0, err_msg=f"d{name}")


CASES = {
  "causal": lambda t, s: None,
  "packed": lambda t, s: _packed(t),
  "left_padded": lambda t, s: _padded(t, "left"),
  "right_padded": lambda t, s: _padded(t, "right"),
  "prefill": _prefill,
  "decode": lambda t, s: _decode(s),
}
SQUARE = ("causal", "packed", "left_padded", "right_padded")


HEADS = {"gqa": (4, 2), "mqa": (4, 1), "mha": (2, 2)}


@pytest.mark.parametrize(
  "case, heads, block",
  [
    ("causal", "gqa", 8),
    ("packed", "gqa", 13),  # blocks that do not divide the length
    ("packed", "mha", 512),  # one block
    ("left_padded", "mqa", 8),
    ("right_padded", "gqa", 512),
    ("prefill", "gqa", 8),
    ("prefill", "mqa", 13),
    ("decode", "gqa", 8),
    ("decode", "mha", 512),
  ],
)
def test_blockwise_equals_xla(case, heads, block):
  t = 1 if case == "decode" else (9 if case == "prefill" else 37)
  s = 40 if case in ("prefill", "decode") else t
  q, k, v = _qkv(t, s, *HEADS[heads], seed=block)
  _assert_same("blockwise", q, k, v, CASES[case](t, s), block_size=block)


@pytest.mark.parametrize("case", ["causal", "packed", "left_padded", "decode"])
def test_splash_in_the_pallas_interpreter_equals_xla(case):
  """Training masks run the splash kernel (interpreted off TPU); cache masks take the blockwise path."""
  t = 1 if case == "decode" else (9 if case == "prefill" else 37)
  s = 40 if case in ("prefill", "decode") else t
  q, k, v = _qkv(t, s, 4, 2)
  _assert_same("splash", q, k, v, CASES[case](t, s), block_size=128)


def test_splash_runs_the_kernel_for_training_masks_only(monkeypatch):
  calls = []
  real = attention.splash_attention
  monkeypatch.setattr(attention, "splash_attention", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
  q, k, v = _qkv(16, 16, 4, 2)
  for case in SQUARE:
    jax.eval_shape(lambda q, k, v: attend(q, k, v, CASES[case](16, 16), impl="splash"), q, k, v)
  assert len(calls) == 4 and calls[0] is None  # mask=None: plain causal, no segment ids
  q, k, v = _qkv(1, 40, 4, 2)
  jax.eval_shape(lambda q, k, v: attend(q, k, v, _decode(40), impl="splash"), q, k, v)
  assert len(calls) == 4
  with pytest.raises(ValueError, match="block=100 must be a multiple of 128"):
    attend(q, q, q, None, impl="splash", block_size=100)


def test_cudnn_takes_plain_causal_attention_and_hands_other_masks_to_blockwise(monkeypatch):
  """No GPU here: `jax.nn.dot_product_attention` runs with XLA's implementation in place of cuDNN's."""
  calls = []
  real = jax.nn.dot_product_attention

  def portable(q, k, v, *, is_causal, implementation):
    calls.append(implementation)
    return real(q, k, v, is_causal=is_causal, implementation=None)

  monkeypatch.setattr(jax.nn, "dot_product_attention", portable)
  q, k, v = _qkv(37, 37, 4, 2)
  _assert_same("cudnn", q, k, v, None)
  assert calls and set(calls) == {"cudnn"}
  calls.clear()
  for case in ("packed", "left_padded", "right_padded"):
    _assert_same("cudnn", q, k, v, CASES[case](37, 37))
  q, k, v = _qkv(1, 40, 4, 2)
  _assert_same("cudnn", q, k, v, _decode(40))
  assert calls == []


def test_auto_picks_per_platform_and_names_are_checked():
  assert jax.default_backend() == "cpu" and attention.resolve_impl("auto") == "blockwise"
  assert [attention.resolve_impl(i) for i in ("xla", "blockwise", "splash", "cudnn")] == [
    "xla",
    "blockwise",
    "splash",
    "cudnn",
  ]
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.resolve_impl("flash")
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    qwen3.Qwen3Config(
      vocab_size=8,
      hidden_size=8,
      intermediate_size=8,
      num_hidden_layers=1,
      num_attention_heads=1,
      num_key_value_heads=1,
      head_dim=8,
      attention_impl="flash",
    )


def test_mask_shapes_are_checked():
  q, k, v = _qkv(6, 6, 2, 1)
  mask = AttentionMask(jnp.ones((B, 6), jnp.int32), jnp.ones((B, 6), jnp.int32), jnp.zeros((B, 1), jnp.int32))
  with pytest.raises(ValueError, match=r"q_index_BT has shape \(2, 1\); expected \(2, 6\)"):
    attend(q, k, v, mask, impl="blockwise")


def test_training_masks_keep_their_type_through_transformations():
  mask = causal_mask((B, 8), attention_mask_BT=jnp.ones((B, 8), jnp.int32))
  seen = []
  jax.jit(jax.checkpoint(lambda m: seen.append(type(m)) or m.q_index_BT))(mask)
  jax.lax.scan(lambda c, m: (seen.append(type(m)) or c, None), 0, jax.tree.map(lambda a: a[None], mask))
  assert seen == [SelfAttentionMask, SelfAttentionMask]


def test_blockwise_rows_that_see_nothing_give_zero():
  q, k, v = _qkv(6, 6, 2, 1)
  same_row = jnp.asarray([[1, 1, 3, 3, 1, 1]] * B)  # queries 2 and 3 are in a segment no key belongs to
  mask = AttentionMask(same_row, jnp.ones((B, 6), jnp.int32), jnp.full((B, 6), 5, jnp.int32))
  out, grads = _out_and_grads("blockwise", q, k, v, mask, block_size=4)
  assert np.all(np.asarray(out)[:, 2:4] == 0) and np.all(np.abs(np.asarray(out)[:, [0, 1, 4, 5]]).sum(-1) > 0)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  assert np.all(np.asarray(grads[0])[:, 2:4] == 0)


def test_blockwise_decode_reads_only_the_live_prefix_of_the_cache():
  """Key blocks past the furthest query column are never read: NaN there leaves the output finite."""
  q, k, v = _qkv(1, 64, 4, 2)
  col = jnp.asarray([[3], [20]], jnp.int32)
  mask = AttentionMask(jnp.ones((B, 1), jnp.int32), (jnp.arange(64)[None] <= col).astype(jnp.int32), col)
  k, v = (x.at[:, 24:].set(jnp.nan) for x in (k, v))  # block_size 8: blocks 0-2 hold columns 0-23
  out = attend(q, k, v, mask, impl="blockwise", block_size=8)
  ref = attend(q[:, :, :], k[:, :24], v[:, :24], AttentionMask(mask[0], mask[1][:, :24], col), impl="xla")
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def _skewed_cache(b, t, s, short=None, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, x, n, 8)), jnp.float32) for x, n in ((t, 4), (s, 2), (s, 2)))
  lens = rng.integers(1, short or s // 4, size=b)
  lens[0] = s - t  # one long row among short ones
  q_idx = jnp.asarray(lens[:, None] + np.arange(t)[None], jnp.int32)
  kv_seg = jnp.asarray(np.arange(s)[None] < lens[:, None] + t, jnp.int32)
  return q, k, v, (jnp.ones((b, t), jnp.int32), kv_seg, q_idx), lens


@pytest.mark.parametrize("b,t,rows", [(6, 1, 2), (5, 3, 8), (9, 1, 4)])
def test_ragged_blockwise_is_bitwise_the_dense_schedule_and_has_its_gradient(b, t, rows):
  from retool_jax.models.blockwise_attention import blockwise_attention  # noqa: PLC0415

  q, k, v, mask, _ = _skewed_cache(b, t, 96)
  run = lambda ragged: jax.jit(  # noqa: E731
    lambda q, k, v: blockwise_attention(q, k, v, *mask, block_q=8, block_k=8, ragged=ragged, ragged_rows=rows)
  )
  assert np.array_equal(np.asarray(run(True)(q, k, v)), np.asarray(run(False)(q, k, v)))
  grads = [
    jax.grad(lambda q, k, v, r=r: jnp.sum(run(r)(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v) for r in (0, 1)
  ]
  for dense, ragged in zip(*grads):
    np.testing.assert_allclose(np.asarray(ragged), np.asarray(dense), atol=1e-6, rtol=0)


def test_cached_decode_rows_read_only_their_own_prefix():
  """Over a KV cache a short row stops at its own last block: NaN past it stays out of its output.

  One row holds 96 columns, the others fewer than 8: past block 0 only the long row is computed.
  """
  q, k, v, mask, _ = _skewed_cache(6, 1, 96, short=7)
  poisoned = (np.arange(96)[None, :] >= 8) & (np.arange(6)[:, None] > 0)
  poisoned = poisoned[:, :, None, None]
  k_bad, v_bad = (jnp.where(poisoned, jnp.nan, x) for x in (k, v))
  out = attend(q, k_bad, v_bad, AttentionMask(*mask), impl="blockwise", block_size=8)
  ref = attend(q, k, v, AttentionMask(*mask), impl="xla")
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def _shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _shapes(sub)


def test_blockwise_forward_and_backward_never_build_a_T_by_S_array():
  t = s = 2048
  n, kv, h = 2, 1, 8
  q, k, v = (jax.ShapeDtypeStruct(x, jnp.float32) for x in ((1, t, n, h), (1, s, kv, h), (1, s, kv, h)))
  mask = causal_mask((1, t), segment_ids_BT=jnp.ones((1, t), jnp.int32))

  def grad_jaxpr(impl):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask, impl=impl) ** 2)  # noqa: E731
    return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr

  largest = lambda jaxpr: max(math.prod(shape) for shape in _shapes(jaxpr))  # noqa: E731
  assert largest(grad_jaxpr("xla")) >= n * t * s  # the check sees the reference's score matrix
  assert largest(grad_jaxpr("blockwise")) < t * s
  assert largest(grad_jaxpr("blockwise")) <= n * 512 * 512


def test_blockwise_under_a_mesh_equals_xla():
  """Rows over (data, fsdp), heads over tensor, jitted with NamedShardings; splash runs under shard_map."""
  mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
  q, k, v = _qkv(37, 37, 4, 2)
  q, k, v = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v))  # four rows
  seg = jnp.asarray([[1] * 20 + [2] * 17, [1] * 37, [0] * 3 + [1] * 34, [1] * 30 + [0] * 7])
  mask = causal_mask((4, 37), segment_ids_BT=seg)
  spec = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))
  q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
  with jax.set_mesh(mesh):
    results = {
      impl: _out_and_grads(impl, q, k, v, mask, block_size=128 if impl == "splash" else 16)
      for impl in ("xla", "blockwise", "splash")
    }
  for impl in ("blockwise", "splash"):
    for a, b in zip(jax.tree.leaves(results[impl]), jax.tree.leaves(results["xla"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=impl)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_bfloat16_is_close_to_xla(impl):
  """bfloat16 inputs, float32 accumulation (splash under this suite's global 'highest' matmul precision)."""
  q, k, v = _qkv(37, 37, 4, 2, dtype=jnp.bfloat16)
  out, grads = _out_and_grads(impl, q, k, v, _packed(37), block_size=128 if impl == "splash" else 16)
  ref, ref_grads = _out_and_grads("xla", q, k, v, _packed(37))
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  for a, b in zip((out, *grads), (ref, *ref_grads)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 0.02 * np.abs(b).max() + 1e-2


# ---- the model ------------------------------------------------------------------------------------------

CFG = qwen3.Qwen3Config(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
)


def _model_logits_and_grads(cfg, ids, **inputs):
  graphdef, params = nnx.split(qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(ids, **inputs)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(ids.shape[1])), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return logits, grads


@pytest.mark.parametrize(
  "batch, policy", [("padded", dict()), ("packed", dict(remat="full", scan_layers=True))], ids=["padded", "packed"]
)
def test_qwen3_blockwise_equals_xla(batch, policy):
  """Left- and right-padded rows with the plain layer loop; packed rows under full remat and a scan over layers."""
  ids = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (B, 21)).astype(np.int32))
  if batch == "padded":
    inputs = dict(attention_mask=jnp.asarray([[0] * 4 + [1] * 17, [1] * 15 + [0] * 6]))
  else:
    inputs = dict(segment_ids=jnp.asarray([[1] * 8 + [2] * 10 + [0] * 3, [1] * 21]))
  base_logits, base_grads = _model_logits_and_grads(CFG.replace(**policy), ids, **inputs)
  logits, grads = _model_logits_and_grads(CFG.replace(attention_impl="blockwise", **policy), ids, **inputs)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(base_logits), atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_qwen3_cached_decoding_with_blockwise_equals_xla():
  """Prefill of left-padded prompts into a cache, then decode steps: the engine's use of `forward_cached`."""
  ids = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (B, 7)).astype(np.int32))
  prompt_mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
  outs = {}
  for impl in ("xla", "blockwise"):
    graphdef, state = nnx.split(qwen3.Qwen3(CFG.replace(attention_impl=impl), rngs=nnx.Rngs(0)))
    step = jax.jit(
      lambda st, ids, cache, mask: nnx.merge(graphdef, st).forward_cached(ids, cache, attention_mask=mask)
    )
    logits, cache = step(state, ids, nnx.merge(graphdef, state).init_cache(B, 16), prompt_mask)
    steps = [logits]
    for i in range(2):
      logits, cache = step(state, ids[:, i : i + 1], cache, jnp.ones((B, 1), jnp.int32))
      steps.append(logits)
    outs[impl] = steps
  for a, b in zip(outs["blockwise"], outs["xla"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


# ---- TPU ahead-of-time compilation ------------------------------------------------------------------------


def test_splash_compiles_for_a_tpu_topology():
  """A tiny Qwen3's forward and backward with `attention_impl="auto"` lowers the splash kernel and compiles
  for four v5p chips (fsdp=2, tensor=2) on this CPU-only host."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e .[aot]): no TPU compiler on this host")

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: other processes may hold libtpu too
  devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
  mesh = sh.make_mesh(fsdp=2, tensor=2, devices=devices)
  cfg = CFG.replace(
    vocab_size=256,
    hidden_size=256,
    head_dim=128,
    dtype="bfloat16",
    remat="full",
    scan_layers=True,
    attention_impl="auto",
  )
  with jax.set_mesh(mesh):
    assert attention.resolve_impl("auto") == "splash"
    graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(
      lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      state,
      sh.state_shardings(state, mesh),
    )
    rows = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=sh.data_sharding(mesh))

    def loss(params, ids, segment_ids):
      return nnx.merge(graphdef, params)(ids, segment_ids=segment_ids).astype(jnp.float32).mean()

    lowered = jax.jit(jax.grad(loss)).lower(state, rows, rows)
    assert "tpu_custom_call" in lowered.as_text()
    compiled = lowered.compile()
  assert compiled.memory_analysis().temp_size_in_bytes > 0
