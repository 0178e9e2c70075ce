"""Placing values per process (`retool_jax.train.multihost`): host values and PRNG keys as global arrays, and a
process-local copy of a sharded model for an embedded engine. One process here; `test_multiprocess.py` runs the
same code on several."""

import asyncio

import jax
import numpy as np
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.models.qwen3 import Qwen3
from retool_jax.train import multihost
from tiny_qwen3 import tiny_config


def test_host_to_global_places_values_and_keys_replicated():
  mesh = sharding_lib.make_mesh(fsdp=4, tensor=2)
  rep = jax.sharding.NamedSharding(mesh, jax.P())
  step = multihost.host_to_global(np.int32(7), rep)
  assert step.sharding == rep and int(step) == 7
  key = jax.random.key(3)
  placed = multihost.host_to_global(key, rep)
  assert placed.sharding == rep and jax.dtypes.issubdtype(placed.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(placed), jax.random.key_data(key))
  rows = multihost.host_to_global(np.arange(16).reshape(8, 2), sharding_lib.data_sharding(mesh))
  np.testing.assert_array_equal(np.asarray(rows), np.arange(16).reshape(8, 2))


class RecordingEngine:
  def __init__(self, model):
    self.models = [model]

  async def update_weights(self, model, version=None):
    self.models.append(model)


def test_process_local_engine_gets_a_copy_on_the_process_devices():
  mesh = sharding_lib.make_mesh(fsdp=4, tensor=2)
  model = sharding_lib.create_sharded(lambda: Qwen3(tiny_config(), rngs=nnx.Rngs(0)), mesh)
  engine = multihost.ProcessLocalEngine(RecordingEngine, model, mesh)
  assert set(engine.mesh.devices.flat) == set(jax.local_devices())
  assert engine.mesh.shape["tensor"] == 2  # the policy's tensor split where it fits
  asyncio.run(engine.update_weights(model, version=1))
  for local in engine.engine.models:
    for want, got in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(local))):
      assert got.sharding.mesh == engine.mesh
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
