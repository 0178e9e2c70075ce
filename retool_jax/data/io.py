"""Reading local json / jsonl / parquet files through Hugging Face `datasets`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_rows(path: str | os.PathLike, *, limit: int | None = None) -> datasets.Dataset:
  """Loads a local file as a `datasets.Dataset` (no hub access). `limit` keeps the first rows."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"data file not found: {path}")
  builder = BUILDERS.get(path.suffix.lower())
  if builder is None:
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of {sorted(BUILDERS)}")
  try:
    rows = datasets.load_dataset(builder, data_files=str(path), split="train")
  except Exception as e:
    raise ValueError(f"{path}: could not be read as {builder}: {e}") from e
  if limit is not None:
    rows = rows.select(range(min(limit, len(rows))))
  return rows


def drop_nulls(value: Any) -> Any:
  """Removes null fields from nested dicts.

  Arrow stores a column of dicts as one struct type, so every dict in a column gets every key seen in any row,
  with null where it had none; tool schemas and call arguments read through `datasets` must be cleaned.
  (A genuinely null field is dropped too.)
  """
  if isinstance(value, Mapping):
    return {k: drop_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [drop_nulls(v) for v in value]
  return value


def maybe_json(value: Any, where: str) -> Any:
  """Decodes a field that some datasets store as a JSON string (tools, arguments)."""
  if isinstance(value, str):
    try:
      return json.loads(value) if value.strip() else None
    except ValueError as e:
      raise ValueError(f"{where}: not valid JSON ({e})") from e
  return value


def field(row: Mapping[str, Any], name: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
  """`row[name]`, or a ValueError naming the file, row and field."""
  if name not in row or row[name] is None:
    raise ValueError(f"{where}: missing field {name!r} (fields: {sorted(row)})")
  value = row[name]
  if not isinstance(value, kind):
    names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise ValueError(f"{where}: field {name!r} must be {names}, got {type(value).__name__}: {value!r:.80}")
  return value
