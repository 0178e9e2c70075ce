"""Reward registry: built-in names, user ``module:function`` plug-ins, and weighted combinations.

A plug-in is any callable ``fn(response, ground_truth, info, **kwargs)`` returning a
:class:`RewardResult` or a number. When it returns a number, ``correct``, ``extracted`` and
``format_ok`` are still filled in by verifying the response, so accuracy stays the verified
correctness whatever the reward.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from retool_jax.rewards import math_rewards, verify
from retool_jax.rewards.result import RewardFn, RewardResult, TrajectoryInfo, as_info

_BUILTIN: dict[str, Callable[..., RewardFn]] = {
  "math": math_rewards.MathReward,
  "retool": math_rewards.retool_reward,
  "format": math_rewards.FormatReward,
}
_FACTORIES = dict(_BUILTIN)


def register_reward(name: str, factory: Callable[..., RewardFn]) -> None:
  """Makes ``get_reward(name, **kwargs)`` return ``factory(**kwargs)``."""
  if not name or ":" in name or "." in name:
    raise ValueError(f"reward names may not be empty or contain ':' or '.', got {name!r}")
  if name in _FACTORIES:
    raise ValueError(f"a reward named {name!r} is already registered")
  _FACTORIES[name] = factory


def available_rewards() -> list[str]:
  """Registered reward names."""
  return sorted(_FACTORIES)


@dataclasses.dataclass(frozen=True)
class PluginReward:
  """Adapts a user reward callable, verifying correctness itself when given a bare number."""

  fn: Callable[..., Any]
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  mode: verify.Mode = "lenient"

  def __call__(
    self, response: str, ground_truth: str, info: TrajectoryInfo | Mapping[str, Any] | None = None
  ) -> RewardResult:
    info = as_info(info)
    value = self.fn(response, ground_truth, info, **self.kwargs)
    if isinstance(value, RewardResult):
      return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
      return math_rewards.grade(response, ground_truth, info, mode=self.mode).result(float(value))
    name = getattr(self.fn, "__qualname__", repr(self.fn))
    raise TypeError(f"reward function {name} returned {type(value).__name__}; expected RewardResult or a number")


@dataclasses.dataclass(frozen=True)
class CombinedReward:
  """Weighted sum of rewards. ``correct``, ``extracted`` and ``format_ok`` come from the first part.

  Metrics hold each part's unweighted reward as ``reward/<name>``, and the first part's metrics.
  """

  parts: tuple[tuple[str, RewardFn, float], ...]

  def __call__(
    self, response: str, ground_truth: str, info: TrajectoryInfo | Mapping[str, Any] | None = None
  ) -> RewardResult:
    results = [(name, fn(response, ground_truth, info), w) for name, fn, w in self.parts]
    primary = results[0][1]
    metrics = dict(primary.metrics)
    metrics.update({f"reward/{name}": result.reward for name, result, _ in results})
    return dataclasses.replace(primary, reward=sum(w * result.reward for _, result, w in results), metrics=metrics)


def _load_plugin(spec: str) -> Callable[..., Any]:
  module_name, _, attr = spec.partition(":")
  if not module_name or not attr:
    raise ValueError(f"a plug-in reward is written 'module:function', got {spec!r}")
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise ValueError(f"cannot import module {module_name!r} of reward {spec!r}: {error}") from error
  fn = module
  for part in attr.split("."):
    if not hasattr(fn, part):
      raise ValueError(f"reward {spec!r}: {module_name!r} has no attribute {attr!r}")
    fn = getattr(fn, part)
  if not callable(fn):
    raise ValueError(f"reward {spec!r} is not callable")
  return fn


def combine_rewards(weighted: Mapping[Any, float] | Sequence[tuple[Any, float]]) -> CombinedReward:
  """Weighted sum of rewards given as ``{spec: weight}`` or ``[(spec, weight), ...]``.

  Each spec is anything :func:`get_reward` accepts without arguments; the first one decides
  ``correct``.
  """
  items = list(weighted.items()) if isinstance(weighted, Mapping) else list(weighted)
  if not items:
    raise ValueError("combine_rewards needs at least one (reward, weight) pair")
  parts = []
  for spec, weight in items:
    if not isinstance(weight, numbers.Real) or isinstance(weight, bool):
      raise TypeError(f"the weight of reward {spec!r} must be a number, got {weight!r}")
    name = spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)
    parts.append((name, get_reward(spec), float(weight)))
  return CombinedReward(tuple(parts))


def _split_top_level(text: str, separator: str) -> list[str]:
  """``text`` split at ``separator`` where it stands outside brackets and quotes."""
  parts, depth, quote, start = [], 0, "", 0
  for i, char in enumerate(text):
    if quote:
      quote = "" if char == quote and text[i - 1] != "\\" else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == separator and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return [*parts, text[start:]]


def parse_weighted(spec: str) -> list[tuple[str, float]]:
  """``"retool + 0.5 * format"`` -> ``[("retool", 1.0), ("format", 0.5)]`` (terms ``[weight *] reward``).

  A term's reward may carry options, ``0.5 * math(strict=True)``; they stay in its string (see
  :func:`parse_options`).
  """
  terms = []
  for term in _split_top_level(spec, "+"):
    *weight, name = _split_top_level(term, "*")
    name = name.strip()
    try:
      value = float("*".join(weight)) if weight else 1.0
    except ValueError:
      value = None
    if not name or value is None:
      raise ValueError(
        f"reward {spec!r}: cannot read the term {term.strip()!r}; write 'reward' or 'weight * reward'"
      )
    terms.append((name, value))
  return terms


_WITH_OPTIONS = re.compile(r"\A\s*([^()\s]+)\s*(?:\((.*)\))?\s*\Z", re.DOTALL)


def parse_options(spec: str) -> tuple[str, dict[str, Any]]:
  """``"retool(strict=True, wrong_reward=-0.5)"`` -> ``("retool", {"strict": True, "wrong_reward": -0.5})``.

  Options are keyword arguments with Python literal values.
  """
  match = _WITH_OPTIONS.match(spec)
  if match is None:
    raise ValueError(f"reward {spec!r}: write 'name' or 'name(option=value, ...)'")
  name, arguments = match.group(1), match.group(2)
  if arguments is None or not arguments.strip():
    return name, {}
  try:
    call = ast.parse(f"options({arguments})", mode="eval").body
  except SyntaxError as error:
    raise ValueError(f"reward {spec!r}: cannot read its options ({error.msg})") from error
  if call.args or any(k.arg is None for k in call.keywords):
    raise ValueError(f"reward {spec!r}: options are written 'option=value', by name")
  options = {}
  for keyword in call.keywords:
    try:
      options[keyword.arg] = ast.literal_eval(keyword.value)
    except ValueError as error:
      raise ValueError(
        f"reward {spec!r}: option {keyword.arg!r} must be a literal (number, string, True/False/None)"
      ) from error
  return name, options


def _builtin_options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
  """``strict=True`` / ``False`` of a built-in reward is ``mode="strict"`` / ``"lenient"``."""
  if name not in _BUILTIN or "strict" not in kwargs:
    return kwargs
  kwargs = dict(kwargs)
  strict = kwargs.pop("strict")
  if not isinstance(strict, bool):
    raise ValueError(f"reward {name!r}: option strict must be True or False, got {strict!r}")
  if "mode" in kwargs:
    raise ValueError(f"reward {name!r}: give strict or mode, not both")
  kwargs["mode"] = "strict" if strict else "lenient"
  return kwargs


def get_reward(spec: Any, **kwargs: Any) -> RewardFn:
  """A reward function from a name, a ``module:function`` path, a callable, or ``{spec: weight}``.

  Examples: ``get_reward("math", mode="strict")``, ``get_reward("retool")``, ``get_reward("retool(strict=True)")``,
  ``get_reward("my_project.rewards:length_penalty", scale=0.1)``,
  ``get_reward({"retool": 1.0, "format": 0.1})`` or, as one string, ``get_reward("retool + 0.1 * format")``.
  Keyword arguments (and options written in the string) go to the factory of a registered name, or to every
  call of a plug-in. The built-in rewards take ``strict=True`` for ``mode="strict"``.
  """
  if isinstance(spec, str) and (len(_split_top_level(spec, "+")) > 1 or len(_split_top_level(spec, "*")) > 1):
    if kwargs:
      raise TypeError("keyword arguments cannot be given with a combination of rewards")
    return combine_rewards(parse_weighted(spec))
  if isinstance(spec, str):
    name, options = parse_options(spec)
    both = sorted(set(options) & set(kwargs))
    if both:
      raise ValueError(f"reward {spec!r}: options {both} are given both in the string and as arguments")
    kwargs = _builtin_options(name, {**options, **kwargs})
    if ":" in name:
      return PluginReward(_load_plugin(name), kwargs)
    if name not in _FACTORIES:
      raise ValueError(f"unknown reward {name!r}; registered: {available_rewards()}, or use 'module:function'")
    try:
      return _FACTORIES[name](**kwargs)
    except TypeError as error:
      raise ValueError(f"reward {spec!r}: {error}") from error
  if isinstance(spec, Mapping) or hasattr(spec, "items"):
    if kwargs:
      raise TypeError("keyword arguments cannot be given with a combination of rewards")
    return combine_rewards(dict(spec.items()))
  if isinstance(spec, (math_rewards.MathReward, math_rewards.FormatReward, PluginReward, CombinedReward)):
    return spec
  if callable(spec):
    return PluginReward(spec, kwargs)
  raise TypeError(f"cannot make a reward from {type(spec).__name__} {spec!r}")
