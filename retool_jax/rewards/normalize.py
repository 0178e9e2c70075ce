"""Answer normalisation for strict (exact-match) comparison.

Two answers are strictly equal when their normalised strings are equal. Normalisation removes
presentation only -- math delimiters, sizing and spacing commands, text wrappers, units, degree
and percent signs, thousands separators, a leading ``x =``, Unicode minus signs -- and writes plain numbers in one
canonical form, so ``"025"``, ``"25"`` and ``"25.0"`` agree. It never evaluates anything.
"""

from __future__ import annotations

import decimal
import re

_TEXT_COMMANDS = ("text", "textbf", "textrm", "textit", "mathrm", "mathbf", "mbox", "boxed", "fbox")
_TEXT_COMMAND = re.compile(r"\\(" + "|".join(_TEXT_COMMANDS) + r")(?![a-zA-Z])\s*\{")
_UNIT_WORDS = (
  "cm",
  "mm",
  "km",
  "meters",
  "meter",
  "metres",
  "metre",
  "inches",
  "inch",
  "feet",
  "foot",
  "ft",
  "miles",
  "mile",
  "mph",
  "units",
  "unit",
  "degrees",
  "degree",
  "dollars",
  "dollar",
  "cents",
  "cent",
  "hours",
  "hour",
  "minutes",
  "minute",
  "seconds",
  "second",
  "days",
  "day",
  "years",
  "year",
  "pounds",
  "pound",
  "grams",
  "gram",
  "kg",
  "square",
  "sq",
  "ways",
  "points",
  "students",
  "people",
  "digits",
  "integers",
  "numbers",
  "times",
)
_TRAILING_UNITS = re.compile(
  r"^(.*?[\d}])\s*(?:(?:" + "|".join(_UNIT_WORDS) + r")\s*)+(?:\^\{?[23]\}?)?$",
  flags=re.IGNORECASE,
)
_REMOVED = (
  r"\displaystyle",
  r"\qquad",
  r"\quad",
  r"^{\circ}",
  r"^\circ",
  r"\circ",
  "°",
  r"\%",
  "%",
  r"\$",
  "$",
)
_RENAMED = ((r"\dfrac", r"\frac"), (r"\tfrac", r"\frac"), (r"\dbinom", r"\binom"), (r"\tbinom", r"\binom"))
_VARIABLE_ASSIGNMENT = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=(.*)$", flags=re.DOTALL)
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)$")


def _unwrap_text_commands(s: str) -> str:
  """Replaces ``\\text{X}`` (and the other text-like commands) by ``X``, braces matched."""
  while match := _TEXT_COMMAND.search(s):
    depth, i = 1, match.end()
    while i < len(s) and depth:
      if s[i] == "\\":
        i += 1
      elif s[i] == "{":
        depth += 1
      elif s[i] == "}":
        depth -= 1
      i += 1
    inner_end = i - 1 if depth == 0 else i
    s = s[: match.start()] + s[match.end() : inner_end] + s[i:]
  return s


def _expand_shorthand(s: str) -> str:
  r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{x}`` -> ``\frac{1}{x}``, ``\sqrt2`` -> ``\sqrt{2}``."""
  s = re.sub(r"\\frac\s*(\w)\s*(\w)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\frac\s*(\w)\s*\{", r"\\frac{\1}{", s)
  s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\w)", r"\\frac\1{\2}", s)
  return re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)


def as_number(normalized: str) -> decimal.Decimal | None:
  """The value of a normalised plain decimal literal (``"-12"``, ``"0.5"``), else None."""
  if not _PLAIN_NUMBER.match(normalized):
    return None
  return decimal.Decimal(normalized)


def _canonical_number(s: str) -> str:
  value = as_number(s)
  if value is None:
    return s
  text = format(value.normalize(), "f")
  return "0" if text in ("-0", "+0") else text


_MINUS_SIGNS = ("\u2212", "\ufe63", "\uff0d")  # minus sign, small and full-width hyphen-minus


def normalize_answer(answer: str) -> str:
  """Canonical string form of a final answer, for exact-match comparison."""
  s = answer.strip()
  for minus in _MINUS_SIGNS:
    s = s.replace(minus, "-")
  for old in _REMOVED:
    s = s.replace(old, "")
  for old, new in _RENAMED:
    s = s.replace(old, new)
  s = re.sub(r"(?<!\\)\\[!,;: ]", "", s)  # spacing commands, not a row break "\\ "
  s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
  s = _unwrap_text_commands(s).strip()
  if assignment := _VARIABLE_ASSIGNMENT.match(s):
    s = assignment.group(1).strip()
  s = s.rstrip(".").strip()
  if units := _TRAILING_UNITS.match(s):
    s = units.group(1)
  s = _expand_shorthand(s)
  s = re.sub(r"\s+", "", s)
  while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _is_one_group(s):
    s = s[1:-1]
  if re.fullmatch(r"\(([A-Za-z])\)", s):  # multiple choice "(C)"
    s = s[1]
  if _THOUSANDS.match(s):
    s = s.replace(",", "")
  return _canonical_number(s)


def _is_one_group(s: str) -> bool:
  """Whether the braces opening at 0 close at the last character."""
  depth = 0
  for i, char in enumerate(s):
    if char == "{" and (i == 0 or s[i - 1] != "\\"):
      depth += 1
    elif char == "}" and (i == 0 or s[i - 1] != "\\"):
      depth -= 1
      if depth == 0:
        return i == len(s) - 1
  return False


def strictly_equal(prediction: str, ground_truth: str) -> bool:
  """Whether two answers are equal after normalisation (never true for empty answers)."""
  pred, gold = normalize_answer(prediction), normalize_answer(ground_truth)
  return bool(gold) and pred == gold
