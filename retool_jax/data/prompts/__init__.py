"""Prompt templates: the ReTool prompt and the styles math loaders can build prompts in."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

PROMPT_STYLES = ("raw", "problem", "retool")


@functools.cache
def retool_template() -> str:
  """The ReTool prompt (Apache-2.0, from ReTool-RL/ReTool); a `str.format` template with `{query}`."""
  text = resources.files(__package__).joinpath("retool.json").read_text(encoding="utf-8")
  return json.loads(text)["retool"]


def build_prompt(
  problem: str,
  style: str = "raw",
  *,
  original: list[dict[str, Any]] | None = None,
  system_prompt: str | None = None,
) -> list[dict[str, Any]]:
  """Prompt messages for `problem`.

  `style`: ``raw`` keeps the dataset's own prompt messages (or the bare problem when it has none),
  ``problem`` is the bare problem, ``retool`` the ReTool prompt; any other string containing ``{query}`` is
  used as a `str.format` template.
  """
  if style == "raw" and original:
    messages = [{"role": m["role"], "content": m["content"]} for m in original]
  elif style in ("raw", "problem"):
    messages = [{"role": "user", "content": problem}]
  elif style == "retool":
    messages = [{"role": "user", "content": retool_template().format(query=problem)}]
  elif "{query}" in style:
    messages = [{"role": "user", "content": style.format(query=problem)}]
  else:
    raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES} or a '{{query}}' template")
  if system_prompt and messages[0]["role"] != "system":
    messages.insert(0, {"role": "system", "content": system_prompt})
  return messages
