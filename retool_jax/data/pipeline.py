"""The input pipeline every trainer reads from, built on grain: shuffled by seed and epoch, sharded across hosts,
resumable.

The source is any random-access collection: the records a loader returns, a `datasets.Dataset`, a TFDS
record source (`retool_jax.data.tfds.load_records`), a grain data source or `grain.MapDataset`, `PackedRows`,
or a dict of equal-length arrays.

Order. Epoch `e` visits the source in the permutation grain's `MapDataset.shuffle` draws for epoch `e` from a
seed derived from `seed` (`visiting_order`); every host computes the same permutation, so hosts never need to
talk. Global step `s` of an epoch covers permutation positions `[s*G, (s+1)*G)` for the global batch size `G`;
host `h` of `P` takes every `P`-th of them starting at `h` (its `G/P` rows of the global batch). Hosts
therefore see disjoint examples, and together all of them; the global order does not depend on `P`.

Remainder, when the epoch size `N` is not a multiple of `G`:

* ``pad`` (default): the epoch's last global batch is filled up with padding slots, `mask == False`,
  holding copies of examples from the start of the same epoch so shapes and types stay uniform. Every
  example is seen exactly once per epoch; the next epoch starts on a fresh batch.
* ``carry``: epochs are laid end to end, so the last batch of an epoch continues with the first examples of
  the next one (in that epoch's order). No padding, and every example is still seen exactly once per epoch;
  only a run limited by `num_epochs` pads its very last batch.

Grain objects. `InputPipeline.dataset` is this host's `grain.MapDataset` of `Batch`es: the range of its global
slot numbers (`h, h+P, ...`, from the position the pipeline started or was restored at), batched by `G/P`. The
pipeline iterates it through a grain `DatasetIterator` (`iterator`), whose `get_state()` counts the batches
handed out.

Position. `state()` is a small JSON-able dict (`seed`, `epoch`, `position` = examples of the epoch already
handed out across all hosts, and `num_examples` as a guard), computed from the grain iterator's state; save it
with the trainer's checkpoint (e.g. as an Orbax `JsonSave` item) and `restore()` it to continue exactly where
the run stopped, with any number of hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from retool_jax.data.packing import PackedRows

REMAINDERS = ("pad", "carry")
STATE_KEYS = ("seed", "epoch", "position", "num_examples")
SYNCHRONOUS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


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


def grain_seed(seed: int) -> int:
  """The 32-bit seed handed to grain's shuffle, mixed from `seed` so that neighbouring seeds share no epoch."""
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


def visiting_order(seed: int, size: int, shuffle: bool = True) -> grain.MapDataset:
  """Epochs end to end: element `e * size + j` is the source index at position `j` of epoch `e`, drawn by
  grain's `shuffle` (which reseeds every epoch); `shuffle=False`: file order every epoch."""
  order = grain.MapDataset.range(size)
  return (order.shuffle(seed=grain_seed(seed)) if shuffle else order).repeat()


def permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  """The visiting order of epoch `epoch`: the same on every host, for every process count."""
  order = visiting_order(seed, size)
  return np.asarray([order[epoch * size + j] for j in range(size)], np.int64)


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


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


class InputPipeline:
  """Iterates `Batch`es of this host's slice of each global batch (see the module docstring).

  `read_options`: how grain reads the batches (default synchronous, in the calling thread; e.g.
  `grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)` reads ahead in threads, in the same order).
  """

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
    read_options: grain.ReadOptions = SYNCHRONOUS,
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
    self.transform, self.collate, self.read_options = transform, collate, read_options
    self.seed = int(seed)
    self._start(0, 0)

  # -- the grain dataset ------------------------------------------------------------------------------------

  def _start(self, epoch: int, position: int) -> None:
    """Builds this host's dataset from `(epoch, position)` on and a fresh grain iterator over it."""
    self._origin = (epoch, position)
    self._order = visiting_order(self.seed, self.num_examples, self.shuffle)
    steps = self._steps_left()
    stop = sys.maxsize if steps is None else steps * self.global_batch_size
    slots = grain.MapDataset.range(self.process_index, stop, self.process_count)  # this host's global slots
    self.dataset = slots.batch(self.batch_size, batch_fn=functools.partial(self._load, self._origin))
    self.iterator = iter(self.dataset.to_iter_dataset(self.read_options))

  def _steps_left(self) -> int | None:
    """Global batches from the origin to the end of the run (None: no end)."""
    (epoch, position), n, g = self._origin, self.num_examples, self.global_batch_size
    if self.num_epochs is None:
      return None
    if epoch >= self.num_epochs:
      return 0
    if self.remainder == "carry":
      return -(-(self.num_epochs * n - epoch * n - position) // g)
    return (_round_up(n - position, g) + (self.num_epochs - epoch - 1) * _round_up(n, g)) // g

  def _locate(self, origin: tuple[int, int], slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, position in the epoch) of global slots counted from `origin`; a position `>= N` is padding."""
    (epoch, position), n, g = origin, self.num_examples, self.global_batch_size
    if self.remainder == "carry":
      return np.divmod(epoch * n + position + slots, n)
    # The rest of the origin's epoch padded to a multiple of G, then whole epochs padded the same way.
    first = _round_up(n - position, g)
    later_epoch, later_position = np.divmod(np.maximum(slots - first, 0), _round_up(n, g))
    in_first = slots < first
    return np.where(in_first, epoch, epoch + 1 + later_epoch), np.where(in_first, position + slots, later_position)

  def _load(self, origin: tuple[int, int], slots: Sequence[int]) -> Batch:
    n = self.num_examples
    epochs, positions = self._locate(origin, np.asarray(slots, np.int64))
    valid = positions < n
    if self.num_epochs is not None:
      valid &= epochs < self.num_epochs
    keys = (epochs * n + positions % n).tolist()
    indices = np.asarray([self._order[k] for k in keys], np.int64)
    return Batch(self._gather(indices), valid, indices, epochs.astype(np.int64))

  def _gather(self, indices: np.ndarray) -> Any:
    if self._columns is not None:
      return {k: v[indices] for k, v in self._columns.items()}
    keys = indices.tolist()
    getitems = getattr(self.source, "__getitems__", None)
    items = list(getitems(keys)) if getitems is not None else [self.source[i] for i in keys]
    if self.transform is not None:
      items = [self.transform(item) for item in items]
    return self.collate(items)

  # -- position ---------------------------------------------------------------------------------------------

  def state(self) -> dict[str, int]:
    """The position to checkpoint: JSON-able, identical on every host."""
    slots = self.iterator.get_state()["next_index"] * self.global_batch_size
    epoch, position = (int(x) for x in self._locate(self._origin, np.asarray(slots)))
    return {"seed": self.seed, "epoch": epoch, "position": position, "num_examples": self.num_examples}

  @property
  def epoch(self) -> int:
    return self.state()["epoch"]

  @property
  def position(self) -> int:
    return self.state()["position"]

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
    self.seed = int(state["seed"])
    self._start(epoch, position)

  def steps_per_epoch(self) -> int:
    """Global batches per epoch (``carry``: on average, rounded up)."""
    return -(-self.num_examples // self.global_batch_size)

  # -- iteration --------------------------------------------------------------------------------------------

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    return next(self.iterator)


def global_batch(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Assembles every host's `[B, ...]` arrays into global `[G, ...]` `jax.Array`s laid out by `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
