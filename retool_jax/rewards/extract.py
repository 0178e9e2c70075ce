"""Final-answer extraction from model responses.

Three answer forms are recognised, and the one that starts last in the response wins:

* ``\\boxed{...}`` (also ``\\fbox``), with nested and escaped braces;
* ``<answer>...</answer>`` tags (the ReTool format); an unclosed tag runs to the end of the
  response, since generation often stops on ``</answer>`` without emitting it;
* ``Answer: ...`` lines (the DAPO format), anchored at the start of a line.

A ``\\boxed{}`` inside an answer tag or an answer line is unwrapped. Text the model did not write
as its own prose -- code cells, interpreter output, tool calls and tool responses -- is removed
first, so a printed ``Answer: 42`` cannot become the model's answer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

Source = Literal["boxed", "answer_tag", "answer_line"]

# Regions written by tools or holding code; an unclosed region runs to the end of the text.
_NON_PROSE_TAGS = ("code", "interpreter", "tool_call", "tool_response")
_NON_PROSE = re.compile("|".join(rf"<{t}>.*?(?:</{t}>|\Z)" for t in _NON_PROSE_TAGS), flags=re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", flags=re.DOTALL)
_ANSWER_LINE = re.compile(
  r"^[ \t>#*_]*(?:final[ \t]+)?answer[ \t*_]*:[ \t*_]*(.*?)[ \t]*$",
  flags=re.IGNORECASE | re.MULTILINE,
)
# Tags that must open and close in turn in a well-formed response.
_PAIRED_TAGS = (*_NON_PROSE_TAGS, "answer")
_TAG = re.compile(r"<(/?)(" + "|".join(_PAIRED_TAGS) + r")>")


@dataclasses.dataclass(frozen=True)
class Extraction:
  """A final answer found in a response.

  Attributes:
    answer: the answer text, with the enclosing ``\\boxed{}`` / tag / prefix removed.
    source: which form it came from.
    boxed: whether the answer was written inside ``\\boxed{}``.
  """

  answer: str
  source: Source
  boxed: bool


def strip_non_prose(text: str) -> str:
  """Removes code cells, interpreter output, tool calls and tool responses."""
  return _NON_PROSE.sub(" ", text)


def _braced(text: str, open_index: int) -> tuple[str, int] | None:
  """Contents of the brace group opening at ``open_index`` and the index after it.

  Backslash-escaped braces (``\\{``) do not count. Returns None if the group never closes.
  """
  depth = 0
  i = open_index
  while i < len(text):
    char = text[i]
    if char == "\\":
      i += 2
      continue
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return text[open_index + 1 : i], i + 1
    i += 1
  return None


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
  """(start, end, contents) of every complete ``\\boxed`` in ``text``."""
  spans = []
  for match in _BOXED.finditer(text):
    i = match.end()
    while i < len(text) and text[i] in " \t":
      i += 1
    if i < len(text) and text[i] == "{":
      group = _braced(text, i)
      if group is not None:
        spans.append((match.start(), group[1], group[0]))
    elif i > match.end():  # ``\boxed 5``: one token up to whitespace or ``$``.
      token = re.match(r"[^\s$]+", text[i:])
      if token:
        spans.append((match.start(), i + token.end(), token.group()))
  return spans


def last_boxed(text: str) -> str | None:
  """Contents of the last complete ``\\boxed{...}`` in ``text``, or None."""
  spans = _boxed_spans(text)
  return spans[-1][2].strip() if spans else None


def _unwrap(content: str) -> tuple[str, bool]:
  """Answer inside an answer tag or line: its last ``\\boxed{}`` if any, else the trimmed text."""
  inner = last_boxed(content)
  if inner is not None:
    return inner, True
  content = content.strip().rstrip(".").strip()
  for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    if len(content) >= len(left) + len(right) and content.startswith(left) and content.endswith(right):
      content = content[len(left) : -len(right)].strip()
      break
  return content.rstrip(".").strip(), False


def extract_answer(response: str) -> Extraction | None:
  """Final answer of ``response`` (see the module docstring), or None if it has none."""
  if not isinstance(response, str):
    raise TypeError(f"response must be a str, got {type(response).__name__}")
  text = strip_non_prose(response)
  # Candidates: (start, end, source, answer, boxed).
  candidates = []
  for match in _ANSWER_TAG.finditer(text):
    answer, boxed = _unwrap(match.group(1))
    candidates.append((match.start(), match.end(), "answer_tag", answer, boxed))
  for match in _ANSWER_LINE.finditer(text):
    answer, boxed = _unwrap(match.group(1))
    candidates.append((match.start(), match.end(), "answer_line", answer, boxed))
  containers = [(start, end) for start, end, *_ in candidates]
  for start, end, contents in _boxed_spans(text):
    if not any(c_start <= start and end <= c_end for c_start, c_end in containers):
      candidates.append((start, end, "boxed", contents.strip(), True))
  candidates = [c for c in candidates if c[3]]
  if not candidates:
    return None
  _, _, source, answer, boxed = max(candidates, key=lambda c: c[0])
  return Extraction(answer=answer, source=source, boxed=boxed)


def tags_balanced(response: str) -> bool:
  """Whether code, interpreter, tool and answer tags open and close in turn, never nested in
  themselves; only a final answer tag may be left open (generation stopped on ``</answer>``)."""
  open_tags: dict[str, bool] = dict.fromkeys(_PAIRED_TAGS, False)
  for match in _TAG.finditer(response):
    closing, tag = bool(match.group(1)), match.group(2)
    if open_tags[tag] is not closing:
      return False
    open_tags[tag] = not closing
  return not any(is_open for tag, is_open in open_tags.items() if tag != "answer")
