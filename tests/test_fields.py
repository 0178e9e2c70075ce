"""The shared unknown-field check every config reader uses."""

import dataclasses

import pytest

from retool_jax.fields import check_fields, dataclass_kwargs, field_names


@dataclasses.dataclass
class _Point:
  x: int = 0
  y_scale: float = 1.0


def test_known_fields_pass_through_as_a_dict():
  assert dataclass_kwargs(_Point, {"x": 3}, "point") == {"x": 3}
  assert field_names(_Point(1)) == {"x", "y_scale"}


def test_unknown_field_names_the_place_the_key_and_a_close_match():
  with pytest.raises(
    ValueError, match=r"point: unknown field\(s\) \['y_scal'\] \(did you mean 'y_scal' -> 'y_scale'\?\)"
  ):
    dataclass_kwargs(_Point, {"y_scal": 2.0}, "point")


def test_error_type_is_the_callers():
  with pytest.raises(KeyError, match="cfg: unknown field"):
    check_fields(["zzz"], {"a"}, "cfg", error=KeyError)
