"""Multi-host logic in one process: hosts simulated by threads that meet in a fake all-gather. Rows of any
lengths and dtypes survive the exchange, and RL trainers on two simulated hosts, each rolling out its own
prompts, train on one global batch: the same update on both, and the update a single process makes."""

import threading
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from retool_jax.demo_task.task import make_problems, prompt_ids
from retool_jax.demo_task.tokenizer import build_tokenizer
from retool_jax.models.qwen3 import Qwen3
from retool_jax.rewards.result import RewardResult
from retool_jax.rollout import MultiTurnConfig
from retool_jax.rollout.types import FinishReason, GenerateResult
from retool_jax.train import state as state_lib
from retool_jax.train.multihost import Ragged, gather_rows, global_sum
from retool_jax.train.rl import RLTrainer
from retool_jax.train.rl_config import RLConfig
from retool_jax.train.rl_run import prompt_pipeline
from tiny_qwen3 import tiny_config


def fake_gathers(count: int) -> list:
  """One gather function per simulated host: each blocks until all hosts have called it, then returns every
  host's pytree stacked along a new leading axis, as `process_allgather` does."""
  barrier, slots = threading.Barrier(count, timeout=120), [None] * count

  def gather_for(host):
    def gather(tree):
      slots[host] = tree
      barrier.wait()
      shapes = {str(jax.tree.map(np.shape, t)) for t in slots}
      assert len(shapes) == 1, f"hosts disagree on shapes: {shapes}"
      out = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *slots)
      barrier.wait()
      return out

    return gather

  return [gather_for(h) for h in range(count)]


def on_hosts(fns: list) -> list:
  """Runs `fns[h]()` for every simulated host at once; returns their results in host order."""
  results, errors = [None] * len(fns), []

  def run(h):
    try:
      results[h] = fns[h]()
    except BaseException as e:  # noqa: BLE001  (re-raised below)
      errors.append(e)

  threads = [threading.Thread(target=run, args=(h,)) for h in range(len(fns))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
  return results


def test_gather_rows_round_trip_with_uneven_hosts():
  rng = np.random.default_rng(0)
  local = []
  for n in (2, 0, 3):  # a host may hold no rows at all
    rows = [rng.integers(0, 1000, int(rng.integers(1, 7))) for _ in range(n)]
    local.append(
      {
        "ids": Ragged.from_rows(rows, np.int32),
        "logp": Ragged.from_rows([-rng.random(len(r)) for r in rows], np.float32),
        "reward": rng.normal(size=n),  # float64: must come back bit for bit
        "correct": rng.random(n) > 0.5,
      }
    )
  gathers = fake_gathers(3)
  out = on_hosts([lambda h=h: gather_rows(local[h], gathers[h]) for h in range(3)])
  want_ids = [r for host in local for r in host["ids"].rows()]
  for got in out:  # every host holds every host's rows, host after host
    assert [r.tolist() for r in got["ids"].rows()] == [r.tolist() for r in want_ids]
    assert got["ids"].values.dtype == np.int32 and got["logp"].values.dtype == np.float32
    np.testing.assert_array_equal(got["logp"].values, np.concatenate([h["logp"].values for h in local]))
    assert got["reward"].dtype == np.float64
    np.testing.assert_array_equal(got["reward"], np.concatenate([h["reward"] for h in local]))
    np.testing.assert_array_equal(got["correct"], np.concatenate([h["correct"] for h in local]))
  gathers = fake_gathers(2)
  empty = {"ids": Ragged.from_rows([], np.int32), "reward": np.zeros(0)}
  for got in on_hosts([lambda h=h: gather_rows(empty, gathers[h]) for h in range(2)]):  # nothing anywhere
    assert got["ids"].rows() == [] and got["reward"].shape == (0,)
  gathers = fake_gathers(3)
  assert on_hosts([lambda h=h: global_sum(h + 1, gathers[h]) for h in range(3)]) == [6, 6, 6]
  with pytest.raises(ValueError, match="different numbers of rows"):
    gather_rows({"a": np.zeros(2), "b": np.zeros(3)}, lambda tree: tree)


def test_prompt_pipeline_gives_each_host_its_own_prompts():
  examples = [SimpleNamespace(prompt=[i], ground_truth=str(i)) for i in range(7)]
  hosts = [prompt_pipeline(examples, num_prompts=4, seed=2, process_index=h, process_count=2) for h in range(2)]
  draws = [[next(p) for p in hosts] for _ in range(7)]  # 28 prompts: exactly 4 passes over 7
  per_pass = {}
  for a, b in draws:
    assert len(a) == len(b) == 2 and a.mask.all() and b.mask.all()
    assert a.examples[0] == {"prompt": examples[a.indices[0]].prompt, "answer": str(a.indices[0])}
    for batch in (a, b):
      for e, i in zip(batch.epoch, batch.indices):
        per_pass.setdefault(int(e), []).append(int(i))
  assert sorted(per_pass) == [0, 1, 2, 3]
  for drawn in per_pass.values():
    assert sorted(drawn) == list(range(7))  # every prompt once per pass, over both hosts
  with pytest.raises(ValueError, match="no prompts"):
    prompt_pipeline([], num_prompts=2, seed=0, process_index=0, process_count=1)


class FakeEngine:
  """Answers trajectory `i` of a host's batch with a fixed text: more sevens for a higher rank in its group,
  so rewards differ within a group, and the same answers whichever host rolls the group out."""

  def __init__(self, tokenizer, group_size: int):
    self.tokenizer, self.group_size, self.weight_version = tokenizer, group_size, 0

  async def generate(self, requests):
    out = []
    for r in requests:
      rank = int(r.request_id.split("-")[0]) % self.group_size
      text = "7" * rank + str(sum(r.prompt_ids) % 10) * (self.group_size - rank)
      ids = self.tokenizer.encode(text) + [self.tokenizer.eos_token_id]
      out.append(GenerateResult(ids, [-0.5] * len(ids), FinishReason("stop", ids[-1]), self.weight_version))
    return out

  async def update_weights(self, model, version):
    self.weight_version = version

  async def health(self):
    return True


def sevens(response, ground_truth, info=None):
  text = response.replace("<|im_end|>", "")
  return RewardResult(text.count("7") / max(len(text), 1), False, None, True)


def _trainer(tokenizer, tx, host: int, hosts: int, gather=None) -> RLTrainer:
  cfg = tiny_config(eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  state = state_lib.TrainState.create(model, tx, jax.random.key(0))
  examples = [
    SimpleNamespace(prompt=prompt_ids(tokenizer, p), ground_truth=p.answer) for p in make_problems(6, seed=0)
  ]
  rl = RLConfig(num_prompts=4, group_size=3, length_multiple=32)
  mt = MultiTurnConfig(
    max_context=128, max_turns=1, max_new_tokens=8, call_formats=("code",), enable_thinking=False
  )
  return RLTrainer(
    rl,
    state,
    engine=FakeEngine(tokenizer, rl.group_size),
    tokenizer=tokenizer,
    tools=None,
    multiturn=mt,
    reward_fn=sevens,
    prompts=prompt_pipeline(examples, num_prompts=4, seed=0, process_index=host, process_count=hosts),
    gather=gather,
  )


def _untimed(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if not k.startswith(("time/", "perf/"))}


def test_two_hosts_train_on_one_global_batch():
  tokenizer = build_tokenizer()
  tx, _ = state_lib.make_optimizer({"learning_rate": 1e-2, "schedule": "constant"}, 10)  # one: one compile
  single = _trainer(tokenizer, tx, 0, 1)
  expected = single.step()
  gathers = fake_gathers(2)
  trainers = [_trainer(tokenizer, tx, h, 2, gathers[h]) for h in range(2)]
  metrics = on_hosts([t.step for t in trainers])
  for t in (*trainers, single):
    t.close()

  a, b = metrics
  assert a["batch_size"] == b["batch_size"] == expected["batch_size"] == 12  # 4 prompts x 3, over both hosts
  assert trainers[0].position() == trainers[1].position() == single.position()  # one pipeline position
  assert trainers[0].position()["prompts_used"] == 4
  assert _untimed(a) == _untimed(b)  # both hosts made the very same update
  for x, y in zip(jax.tree.leaves(trainers[0].state.params), jax.tree.leaves(trainers[1].state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # the groups a single process rolls out, in another row order: the same rewards, the same update
  for key in ("reward_mean", "reward_std", "response_length", "train_reward_mean", "loss", "grad_norm"):
    assert a[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
  assert a["reward_std"] > 0 and a["grad_norm"] > 0  # a real signal, a real update
  for x, y in zip(jax.tree.leaves(trainers[0].state.params), jax.tree.leaves(single.state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
