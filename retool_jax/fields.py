"""Checking a mapping's keys against a dataclass's fields, with one error message for every config reader."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import Any


def field_names(cls: Any) -> set[str]:
  """The field names of a dataclass (class or instance)."""
  return {f.name for f in dataclasses.fields(cls)}


def check_fields(
  values: Mapping[str, Any] | Iterable[str],
  known: Iterable[str],
  where: str,
  *,
  error: type[Exception] = ValueError,
) -> None:
  """Raises `error` naming every key of `values` not in `known`, with the closest known name as a hint."""
  known = set(known)
  unknown = sorted(set(values) - known)
  if not unknown:
    return
  hints = []
  for name in unknown:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    if close:
      hints.append(f"{name!r} -> {close[0]!r}?")
  hint = f" (did you mean {', '.join(hints)})" if hints else ""
  raise error(f"{where}: unknown field(s) {unknown}{hint}; expected some of {sorted(known)}")


def as_dict(values: Any) -> dict[str, Any]:
  """A plain dict from an `ml_collections.ConfigDict` or any mapping."""
  return dict(values.to_dict() if hasattr(values, "to_dict") else values)


def dataclass_kwargs(cls: Any, values: Any, where: str, *, error: type[Exception] = ValueError) -> dict[str, Any]:
  """`values` as keyword arguments for `cls`, after checking that every key is one of its fields."""
  values = as_dict(values)
  check_fields(values, field_names(cls), where, error=error)
  return values
