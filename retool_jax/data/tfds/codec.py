"""Internal records <-> flat string features that round-trip exactly.

Every field of a record is stored as one string: `Example.ground_truth` as it is, everything nested
(messages, tool schemas, metadata) as JSON. Encoding checks that decoding gives back an equal record, so a
value JSON cannot represent (a tuple, a non-string key, NaN) is an error at preparation time, not a silent
change at training time.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from retool_jax.data.records import ChatExample, Example, PreferencePair

Record = Example | ChatExample | PreferencePair
RECORD_TYPES: tuple[type, ...] = (Example, ChatExample, PreferencePair)
PLAIN_FIELDS = frozenset({"ground_truth"})


def field_names(record_type: type) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(record_type))


def record_type_of(names: Any) -> type:
  """The record type whose fields are exactly `names` (the features of a prepared dataset)."""
  names = set(names)
  for record_type in RECORD_TYPES:
    if names == set(field_names(record_type)):
      return record_type
  known = {t.__name__: field_names(t) for t in RECORD_TYPES}
  raise ValueError(f"features {sorted(names)} match no record type; expected the fields of one of {known}")


def _dumps(value: Any) -> str:
  return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode(record: Record, where: str = "record") -> dict[str, str]:
  """The string features of `record`; a ValueError naming `where` and the field if one would not round-trip."""
  out = {}
  for name in field_names(type(record)):
    value = getattr(record, name)
    if name in PLAIN_FIELDS:
      if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
      out[name] = value
      continue
    try:
      text = _dumps(value)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: field {name!r} cannot be stored as JSON: {e}") from e
    if json.loads(text) != value:
      raise ValueError(f"{where}: field {name!r} does not survive JSON unchanged (tuples, non-string keys?)")
    out[name] = text
  return out


def decode(features: Mapping[str, str | bytes], record_type: type) -> Record:
  """The record stored as `features` (values as `str` or UTF-8 `bytes`)."""
  values = {}
  for name in field_names(record_type):
    if name not in features:
      raise ValueError(f"stored {record_type.__name__} has no feature {name!r} (features: {sorted(features)})")
    text = features[name]
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    values[name] = text if name in PLAIN_FIELDS else json.loads(text)
  return record_type(**values)
