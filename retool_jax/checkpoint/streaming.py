"""Writing an Orbax PyTree leaf block by block, so a converter never holds a whole stacked parameter.

A `StreamedArray` leaf describes an array by its shape, dtype and a generator of `(row, block)` pieces along
axis 0; `StreamedArrayHandler` writes each block into the leaf's TensorStore as it is produced. The leaf is
recorded as an ordinary numpy array, so it restores with Orbax's standard handlers (as `jax.Array` on any
sharding).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedArray:
  """An array produced as consecutive blocks of `block_rows` rows (the last may be shorter)."""

  shape: tuple[int, ...]
  dtype: np.dtype
  block_rows: int
  blocks: Callable[[], Iterator[tuple[int, np.ndarray]]]


class StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes `StreamedArray` leaves sequentially; stored chunks are one block each."""

  async def _write_all(self, values: Sequence[StreamedArray], infos, args):
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      spec = ts_utils.build_array_write_spec(
        info,
        arg,
        global_shape=tuple(value.shape),
        local_shape=(min(value.block_rows, value.shape[0]),) + tuple(value.shape[1:]),
        dtype=np.dtype(value.dtype),
        use_ocdbt=info.is_ocdbt_checkpoint,
        process_index=ocdbt_utils.get_process_index_for_subdir(info.is_ocdbt_checkpoint),
      )
      store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
      for start, block in value.blocks():
        await store[start : start + block.shape[0]].write(np.ascontiguousarray(block, dtype=value.dtype))

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    return [
      future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args), name="streamed_array")
    ]


def type_handler_registry() -> ocp.type_handlers.TypeHandlerRegistry:
  return ocp.type_handlers.create_type_handler_registry(
    (jax.Array, ocp.type_handlers.ArrayHandler()),
    (np.ndarray, ocp.type_handlers.NumpyHandler()),
    (StreamedArray, StreamedArrayHandler()),
  )
