"""The Colab notebooks run headless, top to bottom, on the CPU (nbclient, as Colab would run their cells).

Each run gets its own work folder through an injected cell after the notebook's settings cell (the way papermill
injects parameters); everything else runs exactly as written.
"""

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from retool_jax import evaluate as ev

COLAB = Path(__file__).resolve().parents[1] / "colab"


def execute(name: str, after_cell: str, parameters: str, timeout_s: int = 900) -> nbformat.NotebookNode:
  """Runs colab/`name` with a `parameters` cell inserted after the code cell whose source starts `after_cell`."""
  nb = nbformat.read(COLAB / name, as_version=4)
  index = next(
    i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "".join(c.source).startswith(after_cell)
  )
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
  NotebookClient(
    nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(COLAB)}}
  ).execute()
  return nb


def printed(nb: nbformat.NotebookNode) -> str:
  """Everything the code cells wrote to stdout."""
  return "".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
  )


def test_notebooks_are_clean_and_valid():
  for path in sorted(COLAB.glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit notebooks without outputs"
  assert {p.name for p in COLAB.glob("*.ipynb")} >= {
    "quickstart.ipynb",
    "convert_and_chat.ipynb",
    "retool_recipe.ipynb",
  }


@pytest.mark.slow
def test_quickstart_trains_and_writes_a_run(tmp_path):
  workdir = tmp_path / "quickstart"
  nb = execute("quickstart.ipynb", "TINY = ", f"TINY = True\nWORKDIR = {str(workdir)!r}")
  out = printed(nb)
  # The sandbox cell: sympy's factorisation of the fifth Fermat number, and the infinite loop stopped.
  assert "{641: 1, 6700417: 1}" in out
  assert "timeout -" in out
  # Both phases report their held-out figures, and the run folder holds what the README promises.
  for phase in ("sft", "rl"):
    line = next(line for line in out.splitlines() if line.startswith(f"{phase} {{"))
    assert "'accuracy'" in line and "'format_ok'" in line, line
  results = json.loads((workdir / "results.json").read_text())
  for phase in ("sft", "rl"):
    assert all(0.0 <= results[phase][k] <= 1.0 for k in ("accuracy", "format_ok", "tool_use_rate")), results
  assert (workdir / "sft" / "metrics.jsonl").is_file() and (workdir / "rl" / "metrics.jsonl").is_file()
  assert any((workdir / "rl" / "checkpoints").iterdir())

  # The run's RL checkpoint evaluates through the CLI's code path with configs/eval_demo.py.
  spec = importlib.util.spec_from_file_location("eval_demo", COLAB.parent / "configs" / "eval_demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("rl")
  c.workdir, c.data.path = str(workdir / "eval"), str(workdir / "heldout.jsonl")
  c.model.checkpoint, c.data.tokenizer = str(workdir / "rl" / "checkpoints"), str(workdir / "tokenizer")
  c.eval.num_samples, c.eval.pass_k = 2, (1, 2)
  summary = ev.evaluate(c)
  records = [json.loads(line) for line in (workdir / "eval" / "trajectories.jsonl").read_text().splitlines()]
  assert len(records) == 2 * len((workdir / "heldout.jsonl").read_text().splitlines())
  for r in records:
    a, b = (int(x) for x in r["question"].removeprefix("Compute ").rstrip(".").split(" * "))
    assert r["ground_truth"] == str(a * b)
  assert summary["avg@2"] == sum(r["correct"] for r in records) / len(records)


def test_convert_and_chat_runs_a_converted_checkpoint(tmp_path):
  work = tmp_path / "chat"
  nb = execute("convert_and_chat.ipynb", "HF_DIR = ", f"from pathlib import Path\nWORK = Path({str(work)!r})")
  out = printed(nb)
  assert "wrote Orbax checkpoint" in out and "assistant>" in out
  assert "user | Use Python to compute the 20th Fibonacci number." in out
  assert (work / "orbax").is_dir() and (work / "tiny_hf" / "model.safetensors").is_file()


def test_retool_recipe_prints_the_real_commands():
  nb = execute("retool_recipe.ipynb", "RUN_ON_ACCELERATOR = ", "RUN_ON_ACCELERATOR = False")
  out = printed(nb)
  assert "--config=configs/retool_qwen3_4b_sft.py" in out and "--config=configs/retool_qwen3_4b_rl.py" in out
  assert "sglang.launch_server --model-path /ckpt/Qwen3-4B" in out
  assert "learning_rate: 1.0e-06" in out and "clip_high: 0.28" in out
