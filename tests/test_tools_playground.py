"""The playground example's offline stand-in tools, declared by decorator and by JSON schema."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "playground_tools.py"


@pytest.fixture(scope="module")
def playground():
  spec = importlib.util.spec_from_file_location("playground_tools", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_weather_and_search_tools(playground):
  reg = playground.build_registry()
  assert reg.names()[-2:] == ["get_weather", "web_search"]
  assert '"name": "get_weather"' in reg.render_system_block()
  weather = reg.call_sync("get_weather", {"city": "Tokyo"})
  assert weather.output == "Tokyo: clear, 21°C, humidity 55%, wind 9 km/h"
  assert (
    "Known cities: london, new york, paris, sydney, tokyo" in reg.call_sync("get_weather", {"city": "Oslo"}).output
  )
  hits = reg.call_sync("web_search", '{"query": "Qwen3 tool_call format", "max_results": 1}').output
  assert hits.startswith("1. Qwen3 tool calling format (https://example.org/qwen3-tools)")
  assert reg.call_sync("web_search", {"query": "x", "max_results": 0}).status == "invalid_arguments"
  assert reg.call_sync("get_weather", {"city": "Paris", "unit": "kelvin"}).status == "invalid_arguments"
