"""A (data, fsdp, tensor) mesh and an expert-sharded mesh compute what one device computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from retool_jax import sharding
from retool_jax.models import qwen3

DENSE = qwen3.Qwen3Config(
  vocab_size=96,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
)
MOE = DENSE.replace(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)


def _loss_and_grads(model, ids, mesh=None):
  graphdef, params = nnx.split(model)

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(ids[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean(), logits

  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  if mesh is None:
    return fn(params)
  with jax.set_mesh(mesh):
    ids = jax.device_put(ids, sharding.data_sharding(mesh))
    return fn(params)


@pytest.mark.parametrize(
  "cfg,mesh_shape",
  [
    (DENSE, dict(data=2, fsdp=2, tensor=2)),
    (MOE, dict(data=2, fsdp=1, tensor=1, expert=4)),
    (MOE, dict(data=1, fsdp=1, tensor=2, expert=4)),
    (MOE.replace(moe_impl="dense", scan_layers=True), dict(data=1, fsdp=2, tensor=1, expert=4)),
  ],
  ids=["dense-d2f2t2", "moe-d2e4", "moe-t2e4", "moe-dense-f2e4-scan"],
)
def test_mesh_matches_single_device(cfg, mesh_shape):
  assert len(jax.devices()) == 8
  model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 12)).astype(np.int32))
  (loss1, logits1), grads1 = _loss_and_grads(model, ids)

  mesh = sharding.make_mesh(**mesh_shape)
  sharded = sharding.shard_module(model, mesh)
  (loss2, logits2), grads2 = _loss_and_grads(sharded, ids, mesh)
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits1), atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(loss2), float(loss1), atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_sharded_init_places_parameters_by_the_rules():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model = sharding.create_sharded(lambda: qwen3.Qwen3(DENSE, rngs=nnx.Rngs(0)), mesh)
  state = nnx.state(model)
  q = state["dense_layers"]["self_attn"]["q_proj"][...]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)  # [layers, embed, q_heads, head_dim]
  kv = state["dense_layers"]["self_attn"]["k_proj"][...]
  assert kv.sharding.spec == P(None, "fsdp", "tensor", None)
  emb = state["embed_tokens"][...]
  assert emb.sharding.spec == P("tensor", "fsdp")
  # Each device holds only its shard.
  assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 2, 8)}
  # Same values as an unsharded init with the same seed (up to the jitted scaling's rounding).
  plain = qwen3.Qwen3(DENSE, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
    np.asarray(q), np.asarray(nnx.state(plain)["dense_layers"]["self_attn"]["q_proj"][...]), rtol=1e-6, atol=1e-8
  )


def test_indivisible_dimensions_are_replicated():
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  # 2 KV heads cannot be split 4 ways: replicated, never an error.
  spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh)
  assert spec == P("fsdp", None, None)
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(data=3, fsdp=1, tensor=1)


def test_expert_mesh_runs_experts_locally():
  """On a mesh with an expert axis, the ragged MoE path is a shard_map over experts, not a gathered matmul."""
  model = qwen3.Qwen3(MOE, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=1, expert=4)
  ids = jnp.zeros((4, 8), jnp.int32)
  graphdef, params = nnx.split(sharding.shard_module(model, mesh))
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(ids))(params))
  assert "shard_map" in jaxpr
  jaxpr_single = str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(ids))(nnx.state(model)))
  assert "shard_map" not in jaxpr_single


def test_initialize_distributed_only_on_multi_host(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for var in (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
  ):
    monkeypatch.delenv(var, raising=False)
  sharding.initialize_distributed()
  assert calls == []  # one host: nothing to join
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  sharding.initialize_distributed()
  assert calls == [{}]  # a cluster JAX detects by itself
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  sharding.initialize_distributed()
  assert calls[-1] == {"num_processes": 4, "process_id": 2}  # JAX itself reads only the address
  monkeypatch.setenv("JAX_PROCESS_ID", "two")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='two'"):
    sharding.initialize_distributed()
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  sharding.initialize_distributed()
  assert len(calls) == 2
