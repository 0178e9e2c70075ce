"""Declaring your own tools next to the built-in ones, playground style.

    python examples/playground_tools.py

``get_weather`` and ``web_search`` are OFFLINE STAND-INS: they read small local JSON files in
``examples/data/`` instead of calling a weather service or a search engine, so the example runs anywhere
without network access. Swap their bodies for real clients to use them for real.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from retool_jax.tools import Tool, ToolRegistry, default_registry, tool

DATA = Path(__file__).resolve().parent / "data"


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
  """Get the current weather for a city (offline stand-in backed by examples/data/weather.json).

  Args:
      city: the city name, e.g. "Paris"
      unit: temperature unit of the answer
  """
  table = json.loads((DATA / "weather.json").read_text())
  entry = table.get(city.strip().lower())
  if entry is None:
    known = ", ".join(sorted(k for k in table if not k.startswith("_")))
    return f"No weather data for {city!r}. Known cities: {known}"
  temp = entry["temperature_c"] if unit == "celsius" else entry["temperature_c"] * 9 / 5 + 32
  symbol = "°C" if unit == "celsius" else "°F"
  return (
    f"{city.title()}: {entry['condition']}, {temp:g}{symbol}, humidity {entry['humidity']}%, "
    f"wind {entry['wind_kmh']} km/h"
  )


def _search(query: str, max_results: int = 3) -> str:
  pages = json.loads((DATA / "search_index.json").read_text())["pages"]
  words = set(re.findall(r"\w+", query.lower()))
  scored = []
  for page in pages:
    text = f"{page['title']} {page['text']}".lower()
    score = sum(text.count(w) for w in words)
    if score:
      scored.append((score, page))
  scored.sort(key=lambda sp: -sp[0])
  if not scored:
    return f"No results for {query!r}."
  return "\n".join(
    f"{i}. {p['title']} ({p['url']})\n   {p['text']}" for i, (_, p) in enumerate(scored[:max_results], 1)
  )


# A tool declared from a JSON schema, the way configs/*.json files describe tools.
WEB_SEARCH_SPEC = {
  "type": "function",
  "function": {
    "name": "web_search",
    "description": "Search the web (offline stand-in backed by examples/data/search_index.json).",
    "parameters": {
      "type": "object",
      "properties": {
        "query": {"type": "string", "description": "the search query"},
        "max_results": {"type": "integer", "description": "how many results to return", "minimum": 1},
      },
      "required": ["query"],
    },
  },
}
web_search = Tool.from_json_schema(WEB_SEARCH_SPEC, _search)


def build_registry() -> ToolRegistry:
  """The built-in tools plus the two playground tools."""
  registry = default_registry()
  registry.register(get_weather)
  registry.register(web_search)
  return registry


def main() -> None:
  registry = build_registry()
  print(registry.render_system_block())
  calls = [
    ("get_weather", {"city": "Paris", "unit": "fahrenheit"}),
    ("web_search", '{"query": "bubblewrap namespaces", "max_results": 1}'),
    ("calculator", {"expression": "2**10 + sqrt(16)"}),
    ("code_interpreter", {"code": "import sympy as sp\nsp.factorint(2024)"}),
    ("get_weather", {"town": "Paris"}),  # a malformed call comes back as a readable error
  ]
  for name, arguments in calls:
    result = registry.call_sync(name, arguments)
    print(f"\n>>> {name}({arguments}) -> {result.status}\n{result.output.rstrip()}")


if __name__ == "__main__":
  main()
