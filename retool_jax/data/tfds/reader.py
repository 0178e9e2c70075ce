"""Reading prepared datasets back as internal records, by index, without TensorFlow."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from retool_jax.data.tfds import codec


class RecordSource(Sequence):
  """A random-access view of one split that returns `Example`, `ChatExample` or `PreferencePair` records."""

  def __init__(self, source: Any, record_type: type):
    self.source, self.record_type = source, record_type

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> codec.Record:  # type: ignore[override]
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    return codec.decode(self.source[index % len(self)], self.record_type)

  def __getitems__(self, indices: Sequence[int]) -> list[codec.Record]:
    return [codec.decode(row, self.record_type) for row in self.source.__getitems__(list(indices))]

  def __repr__(self) -> str:
    return f"RecordSource({self.record_type.__name__}, {len(self)} records, {self.source!r})"


def load_records(builder_or_dir: tfds.core.DatasetBuilder | str | os.PathLike, split: str) -> RecordSource:
  """The records of `split` from a builder or a prepared dataset directory (`<data_dir>/<name>/<config>/<version>`).

  Reading a directory needs none of the generation code, so any host can read what one host prepared.
  """
  if isinstance(builder_or_dir, tfds.core.DatasetBuilder):
    builder = builder_or_dir
  else:
    builder = tfds.builder_from_directory(os.fspath(builder_or_dir))
  if split not in builder.info.splits:
    splits = list(builder.info.splits)
    raise ValueError(f"{builder.name}: no split {split!r} in {builder.data_dir} (splits: {splits})")
  record_type = codec.record_type_of(builder.info.features.keys())
  return RecordSource(builder.as_data_source(split=split), record_type)
