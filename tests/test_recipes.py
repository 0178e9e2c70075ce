"""Configs are `from retool_jax import recipes` plus what they change, and each resolves to its recorded
ConfigDict. After a deliberate config change, record the new ones with `python tests/test_recipes.py --update`."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECORDED = Path(__file__).with_name("golden") / "configs.json"


def _load(path: Path):
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _arguments(source: str) -> list:
  """The config's default plus every variant its source names (and a run folder for the demo configs)."""
  named = set(re.findall(r'variant == "([^"]+)"', source))
  for choices in re.findall(r"variant not in \(([^)]*)\)", source):
    named |= set(re.findall(r'"([^"]+)"', choices))
  named = sorted(named)
  workdir = ["/tmp/run"] if "workdir: str = DEFAULT_WORKDIR" in source else []
  return [None, *named, *workdir]


def resolve_all() -> dict:
  resolved = {}
  for path in sorted(CONFIGS.glob("*.py")):
    module, source = _load(path), path.read_text()
    for arg in _arguments(source):
      config = module.get_config() if arg is None else module.get_config(arg)
      resolved[f"{path.name}:{arg}"] = json.loads(config.to_json_best_effort(sort_keys=True))
  return resolved


def test_configs_import_the_recipes_instead_of_loading_files_by_path():
  assert not list(CONFIGS.glob("_*.py"))
  for path in CONFIGS.glob("*.py"):
    source = path.read_text()
    assert "importlib" not in source and "spec_from_file_location" not in source, path.name
    if "recipes." in source:
      assert "from retool_jax import recipes" in source, path.name


def test_every_config_resolves_to_its_recorded_config_dict():
  recorded = json.loads(RECORDED.read_text())
  resolved = resolve_all()
  assert sorted(resolved) == sorted(recorded)
  for name, config in resolved.items():
    assert config == recorded[name], f"{name} changed; if on purpose: python tests/test_recipes.py --update"


def test_the_variants_are_recorded():
  assert {"eval_demo.py:sft", "eval_aime.py:tiny", "demo_rl.py:/tmp/run"} <= set(json.loads(RECORDED.read_text()))
  with pytest.raises(ValueError, match="unknown variant"):
    _load(CONFIGS / "eval_demo.py").get_config("nope")


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
  RECORDED.write_text(json.dumps(resolve_all(), indent=1, sort_keys=True) + "\n")
  print(f"recorded {RECORDED}")
