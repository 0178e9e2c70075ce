"""The input pipeline every trainer reads from: shuffled by seed and epoch, sharded across hosts, resumable.

The source is any random-access collection: the records a loader returns, a `datasets.Dataset`, a TFDS
record source (`retool_jax.data.tfds.load_records`), `PackedRows`, or a dict of equal-length arrays.

Order. Epoch `e` visits the source in the permutation drawn from `(seed, e)`; every host computes the same
permutation, so hosts never need to talk. Global step `s` of an epoch covers permutation positions
`[s*G, (s+1)*G)` for the global batch size `G`; host `h` of `P` takes every `P`-th of them starting at `h`
(its `G/P` rows of the global batch). Hosts therefore see disjoint examples, and together all of them.

Remainder, when the epoch size `N` is not a multiple of `G`:

* ``pad`` (default): the epoch's last global batch is filled up with padding slots, `mask == False`,
  holding copies of examples from the start of the same epoch so shapes and types stay uniform. Every
  example is seen exactly once per epoch; the next epoch starts on a fresh batch.
* ``carry``: epochs are laid end to end, so the last batch of an epoch continues with the first examples of
  the next one (in that epoch's order). No padding, and every example is still seen exactly once per epoch;
  only a run limited by `num_epochs` pads its very last batch.

Position. `state()` is a small JSON-able dict (`seed`, `epoch`, `position` = examples of the epoch already
handed out across all hosts, and `num_examples` as a guard); save it with the trainer's checkpoint (e.g. as an
Orbax `JsonSave` item) and `restore()` it to continue exactly where the run stopped, with any number of hosts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from retool_jax.data.packing import PackedRows

REMAINDERS = ("pad", "carry")
STATE_KEYS = ("seed", "epoch", "position", "num_examples")


@dataclasses.dataclass(frozen=True)
class Batch:
  """This host's rows of one global batch.

  `examples`: the source items (after `transform`) collated by `collate` - a list of records, or a dict of
  `[B, ...]` arrays for array sources. `mask`: False on padding slots, which must not count. `indices`: the
  source index of every row. `epoch`: the epoch of each row (rows of a ``carry`` batch can span two).
  """

  examples: Any
  mask: np.ndarray
  indices: np.ndarray
  epoch: np.ndarray

  def __len__(self) -> int:
    return int(self.mask.shape[0])


def default_collate(items: list[Any]) -> Any:
  """Dicts of numbers or numeric arrays are stacked into a dict of arrays; anything else stays a list."""
  if items and all(isinstance(item, Mapping) for item in items):
    keys = items[0].keys()
    if all(item.keys() == keys for item in items):
      stacked = {k: np.asarray([item[k] for item in items]) for k in keys}
      if all(v.dtype.kind in "biuf" for v in stacked.values()):
        return stacked
  return list(items)


def permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  """The visiting order of epoch `epoch`: the same on every host, for every process count."""
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(size)


def _as_columns(source: Any) -> dict[str, np.ndarray] | None:
  if isinstance(source, PackedRows):
    return source.tokens.arrays()
  if isinstance(source, Mapping):
    columns = {k: np.asarray(v) for k, v in source.items()}
    sizes = {k: v.shape[0] if v.ndim else None for k, v in columns.items()}
    if not columns or len(set(sizes.values())) != 1 or None in sizes.values():
      raise ValueError(f"an array source needs columns of equal length, got lengths {sizes}")
    return columns
  return None


class InputPipeline:
  """Iterates `Batch`es of this host's slice of each global batch (see the module docstring)."""

  def __init__(
    self,
    source: Any,
    *,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    remainder: str = "pad",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    transform: Callable[[Any], Any] | None = None,
    collate: Callable[[list[Any]], Any] = default_collate,
  ):
    if process_index is None or process_count is None:
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
      )
    if remainder not in REMAINDERS:
      raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    self._columns = _as_columns(source)
    if self._columns is not None and transform is not None:
      raise ValueError("transform applies to record sources; an array source is returned as arrays")
    self.source = source
    self.num_examples = len(next(iter(self._columns.values()))) if self._columns is not None else len(source)
    if self.num_examples == 0:
      raise ValueError("the input pipeline's source is empty")
    self.global_batch_size = global_batch_size
    self.batch_size = global_batch_size // process_count
    self.process_index, self.process_count = process_index, process_count
    self.shuffle, self.remainder, self.num_epochs = shuffle, remainder, num_epochs
    self.transform, self.collate = transform, collate
    self.seed, self.epoch, self.position = int(seed), 0, 0
    self._orders: dict[int, np.ndarray] = {}

  # -- position ---------------------------------------------------------------------------------------------

  def state(self) -> dict[str, int]:
    """The position to checkpoint: JSON-able, identical on every host."""
    return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_examples": self.num_examples}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from a `state()` saved by this or another run over the same source."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
      raise ValueError(f"pipeline state is missing {missing} (got {dict(state)})")
    if int(state["num_examples"]) != self.num_examples:
      raise ValueError(
        f"pipeline state was saved for {state['num_examples']} examples, but the source has {self.num_examples}"
      )
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position < self.num_examples:
      raise ValueError(f"pipeline state has an invalid position: epoch={epoch}, position={position}")
    self.seed, self.epoch, self.position = int(state["seed"]), epoch, position
    self._orders.clear()

  def steps_per_epoch(self) -> int:
    """Global batches per epoch (``carry``: on average, rounded up)."""
    return -(-self.num_examples // self.global_batch_size)

  # -- iteration --------------------------------------------------------------------------------------------

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) >= 2:
        self._orders.pop(min(self._orders))
      n = self.num_examples
      self._orders[epoch] = permutation(self.seed, epoch, n) if self.shuffle else np.arange(n)
    return self._orders[epoch]

  def _gather(self, indices: np.ndarray) -> Any:
    if self._columns is not None:
      return {k: v[indices] for k, v in self._columns.items()}
    keys = indices.tolist()
    getitems = getattr(self.source, "__getitems__", None)
    items = list(getitems(keys)) if getitems is not None else [self.source[i] for i in keys]
    if self.transform is not None:
      items = [self.transform(item) for item in items]
    return self.collate(items)

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    n, g = self.num_examples, self.global_batch_size
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    slots = np.arange(self.process_index, g, self.process_count)  # this host's rows of the global batch
    if self.remainder == "pad":
      positions = self.position + slots
      epochs = np.full(slots.shape, self.epoch)
      valid = positions < n
      positions = positions % n
      self.position += g
      if self.position >= n:
        self.epoch, self.position = self.epoch + 1, 0
    else:
      stream = self.epoch * n + self.position + slots
      epochs, positions = stream // n, stream % n
      valid = epochs < self.num_epochs if self.num_epochs is not None else np.ones(slots.shape, bool)
      self.epoch, self.position = divmod(self.epoch * n + self.position + g, n)
    indices = np.empty(slots.shape, np.int64)
    for epoch in np.unique(epochs):
      rows = epochs == epoch
      indices[rows] = self._order(int(epoch))[positions[rows]]
    return Batch(self._gather(indices), valid, indices, epochs.astype(np.int64))


def global_batch(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Assembles every host's `[B, ...]` arrays into global `[G, ...]` `jax.Array`s laid out by `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
