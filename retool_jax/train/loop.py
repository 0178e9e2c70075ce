"""The training loop every trainer runs: restore -> (batch -> step -> metrics -> eval -> checkpoint) -> summary.

A trainer builds its model, train state(s) and data, then hands `run` a `Task`: what one step does, where the
data stands (saved with every checkpoint) and the states to checkpoint. The loop gives every trainer the same
run folder and the same resume behaviour:

* `config.json` - the run's config; `prompt_contract.json` (+ `tokenizer/`) - how its prompts are rendered;
* `metrics.jsonl` and `tensorboard/` - one record per logged step (`perf/step_time_s` and friends are
  wall-clock figures);
* `checkpoints/` (and one folder per extra state, e.g. PPO's `critic_checkpoints/`) numbered by step;
* `summary.json` - the last logged metrics; `curves.png` - every metric against the step (`config.log.curves`).

A run started again in the same `workdir` resumes from the latest step every state holds (checkpoints only
some of them reached are deleted and replayed): the states, the data position and the metrics files continue
where they were, so the resumed run logs what an uninterrupted one would (wall-clock figures aside).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.progress import progress_bar
from retool_jax.train.checkpointing import Checkpointer
from retool_jax.train.curves import plot_run
from retool_jax.train.metrics import MetricsWriter
from retool_jax.train.state import TrainState

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


@dataclasses.dataclass
class Saved:
  """A train state the loop checkpoints into `workdir/<directory>` and restores on resume."""

  directory: str
  get: Callable[[], TrainState]
  set: Callable[[TrainState], None]
  shardings: Any = None  # default: where the state's arrays are


@dataclasses.dataclass
class Task:
  """What a trainer plugs into `run`.

  Attributes:
    name: the progress bar's label.
    num_steps: steps of the whole run.
    model_config: the architecture recorded with every checkpoint.
    step: runs one step (the next batch, its update) and returns its metrics as host floats; a `tokens` figure
      gives `perf/tokens_per_s`.
    saved: the checkpointed states; the first one's checkpoint also records `position()`.
    position: where the data stands after the steps taken (what the next step reads).
    restore: given the first state's checkpoint record (`data`: the saved position) and its step, puts the data
      (and anything derived from the restored states, e.g. an engine's weights) where the run was.
    evaluate: eval metrics after a step, or None; run every `eval_every` steps (0: only after the last).
    log_every: steps between logged records (the last step is always logged).
    progress: `{label: (metric, format)}` shown on the progress bar (plain lines when stderr is no terminal).
    close: releases what the task holds (engines, event loops) after the last step.
  """

  name: str
  num_steps: int
  model_config: Qwen3Config
  step: Callable[[], dict[str, float]]
  saved: Sequence[Saved]
  position: Callable[[], Mapping[str, Any]]
  restore: Callable[[Mapping[str, Any], int], None]
  evaluate: Callable[[], dict[str, float]] | None = None
  eval_every: int = 0
  log_every: int = 1
  progress: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
  close: Callable[[], None] | None = None


def checkpointers(config: ml_collections.ConfigDict, task: Task) -> list[Checkpointer]:
  """One `Checkpointer` per saved state, under `config.workdir`, as `config.checkpoint` says."""
  cc = config.checkpoint
  return [
    Checkpointer(
      Path(config.workdir) / s.directory, save_every=cc.every_steps, keep=cc.keep, async_save=cc.async_save
    )
    for s in task.saved
  ]


def restore(task: Task, ckpts: Sequence[Checkpointer]) -> int:
  """Restores the latest step every checkpointer holds (deleting later ones, to be replayed); returns it (0 for
  a fresh run)."""
  common = set.intersection(*(set(ck.all_steps()) for ck in ckpts))
  start = max(common) if common else None
  for ck in ckpts:
    ck.delete_after(start)
  if start is None:
    return 0
  record = None
  for saved, ck in zip(task.saved, ckpts):
    state, train_record = ck.restore(saved.get(), saved.shardings, start)
    saved.set(state)
    record = train_record if record is None else record
  task.restore(record, start)
  return start


def write_run_files(config: ml_collections.ConfigDict, contract: Callable[[Path], Any] | None = None) -> None:
  """`config.json` and, through `contract(workdir)`, the prompt contract (process 0 only)."""
  if jax.process_index() != 0:
    return
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")
  if contract is not None:
    contract(workdir)


def _due(step: int, every: int, last: int) -> bool:
  return step == last or bool(every) and step % every == 0


def run(
  config: ml_collections.ConfigDict,
  task: Task,
  mesh: jax.sharding.Mesh,
  *,
  contract: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
  """Restores `task` from `config.workdir` (if it holds checkpoints), writes the run files, runs the remaining
  steps, and writes `summary.json`; returns the last logged metrics (with their `step`)."""
  workdir = Path(config.workdir)
  ckpts = checkpointers(config, task)
  start = restore(task, ckpts)
  write_run_files(config, contract)
  bar = progress_bar(
    task.num_steps, initial=start, desc=task.name, disable=not config.log.progress or jax.process_index() != 0
  )
  last: dict[str, Any] = {}
  with (
    MetricsWriter(workdir, resume_step=start or None, tensorboard=config.log.tensorboard) as writer,
    jax.set_mesh(mesh),  # activations follow the logical-axis table; attention kernels shard over the mesh
  ):
    for step in range(start + 1, task.num_steps + 1):
      t0 = time.perf_counter()
      metrics = dict(task.step())
      elapsed = time.perf_counter() - t0
      metrics["perf/step_time_s"] = elapsed
      if "tokens" in metrics and "perf/tokens_per_s" not in metrics:
        metrics["perf/tokens_per_s"] = metrics["tokens"] / elapsed
      if task.evaluate is not None and _due(step, task.eval_every, task.num_steps):
        metrics.update(task.evaluate())
      if _due(step, task.log_every, task.num_steps):
        writer.write(step, metrics)
        last = {"step": step, **metrics}
      position = task.position()
      for saved, ck in zip(task.saved, ckpts):
        ck.save(saved.get(), task.model_config, data_state=position, step=step, force=step == task.num_steps)
      bar.set_postfix(
        {label: format(metrics[key], fmt) for label, (key, fmt) in task.progress.items() if key in metrics},
        refresh=False,
      )
      bar.update(1)
  bar.close()
  for ck in ckpts:
    ck.close()
  if task.close is not None:
    task.close()
  summary = workdir / SUMMARY_FILE
  if not last and summary.exists():  # nothing left to run: the finished run's summary stands
    return json.loads(summary.read_text())
  if jax.process_index() == 0:
    summary.write_text(json.dumps(last, indent=2) + "\n")
    if config.log.curves:
      plot_run(workdir)
  return last
