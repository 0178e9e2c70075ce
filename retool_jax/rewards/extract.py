"""Final-answer extraction from model responses.

Three answer forms are recognised, and the one that starts last in the response wins:

* ``\\boxed{...}`` (also ``\\fbox``), with nested and escaped braces;
* ``<answer>...</answer>`` tags (the ReTool format); an unclosed tag runs to the end of the
  response, since generation often stops on ``</answer>`` without emitting it;
* ``Answer: ...`` lines (the DAPO format), anchored at the start of a line.

A ``\\boxed{}`` inside an answer tag or an answer line is unwrapped. The last answer the model started is
its final one: if that is an empty or unclosed box, the response has no final answer. Text the model did not write
as its own prose -- code cells, interpreter output, tool calls and tool responses -- is removed
first, so a printed ``Answer: 42`` cannot become the model's answer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from retool_jax.chat.parse import opens_tool_call

Source = Literal["boxed", "answer_tag", "answer_line"]

# Regions written by tools or holding code; an unclosed region runs to the end of the text. A `<tool_call>`
# named in prose opens no region, as it opens no call (`opens_tool_call`).
_NON_PROSE_TAGS = ("code", "interpreter", "tool_call", "tool_response")
_NON_PROSE_OPEN = re.compile("<(" + "|".join(_NON_PROSE_TAGS) + ")>")
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
  kept, pos = [], 0
  while match := _NON_PROSE_OPEN.search(text, pos):
    tag = match.group(1)
    if tag == "tool_call" and not opens_tool_call(text, match.start()):
      kept.append(text[pos : match.end()])
      pos = match.end()
      continue
    close = text.find(f"</{tag}>", match.end())
    kept.append(text[pos : match.start()] + " ")
    pos = len(text) if close == -1 else close + len(tag) + 3
  return "".join(kept) + text[pos:]


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


def _boxed_spans(text: str) -> list[tuple[int, int, str | None]]:
  """(start, end, contents) of every ``\\boxed`` in ``text``; contents None for a box that never closes."""
  spans: list[tuple[int, int, str | None]] = []
  for match in _BOXED.finditer(text):
    i = match.end()
    while i < len(text) and text[i] in " \t":
      i += 1
    if i < len(text) and text[i] == "{":
      group = _braced(text, i)
      spans.append((match.start(), len(text), None) if group is None else (match.start(), group[1], group[0]))
    elif i > match.end():  # ``\boxed 5``: one token up to whitespace or ``$``.
      token = re.match(r"[^\s$]+", text[i:])
      if token:
        spans.append((match.start(), i + token.end(), token.group()))
  return spans


def last_boxed(text: str) -> str | None:
  """Contents of the last ``\\boxed{...}`` in ``text``; None if there is none or the last one never closes."""
  spans = _boxed_spans(text)
  if not spans or spans[-1][2] is None:
    return None
  return spans[-1][2].strip()


def _unwrap(content: str) -> tuple[str, bool]:
  """Answer inside an answer tag or line: its last ``\\boxed{}`` if any, else the trimmed text.

  A last box left open is an unfinished answer: ``""``.
  """
  spans = _boxed_spans(content)
  if spans:
    return (spans[-1][2] or "").strip(), True
  content = content.strip().rstrip(".").strip()
  for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    if len(content) >= len(left) + len(right) and content.startswith(left) and content.endswith(right):
      content = content[len(left) : -len(right)].strip()
      break
  return content.rstrip(".").strip(), False


def extract_answer(response: str) -> Extraction | None:
  """Final answer of ``response`` (see the module docstring), or None if it has none.

  The last answer the model started is its final one: when that is an empty or unclosed ``\\boxed{}`` or an
  empty answer tag, the response has no final answer (an earlier box is not a fallback). Empty ``Answer:``
  lines are headings and are skipped.
  """
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
    if answer:
      candidates.append((match.start(), match.end(), "answer_line", answer, boxed))
  containers = [(start, end) for start, end, *_ in candidates]
  for start, end, contents in _boxed_spans(text):
    if not any(c_start <= start and end <= c_end for c_start, c_end in containers):
      candidates.append((start, end, "boxed", (contents or "").strip(), True))
  if not candidates:
    return None
  _, _, source, answer, boxed = max(candidates, key=lambda c: c[0])
  if not answer:
    return None
  return Extraction(answer=answer, source=source, boxed=boxed)


def tags_balanced(response: str) -> bool:
  """Whether code, interpreter, tool and answer tags open and close in turn, never nested in
  themselves; only a final answer tag may be left open (generation stopped on ``</answer>``)."""
  open_tags: dict[str, bool] = dict.fromkeys(_PAIRED_TAGS, False)
  for match in _TAG.finditer(response):
    closing, tag = bool(match.group(1)), match.group(2)
    if tag == "tool_call" and not closing and not opens_tool_call(response, match.start()):
      continue  # the tag named in prose
    if open_tags[tag] is not closing:
      return False
    open_tags[tag] = not closing
  return not any(is_open for tag, is_open in open_tags.items() if tag != "answer")
