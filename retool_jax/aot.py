"""Will it fit? Compiles every program a run of a config executes, for a TPU slice, on a CPU-only machine.

    python -m retool_jax.aot --config=configs/retool_qwen3_4b_rl.py --topology=v5p-8 [--config.field=value ...]

XLA's TPU compiler (libtpu: `pip install -e ".[aot]"`) compiles each program of the run (SFT train and eval
steps; RL log-probs, reference log-probs, policy update, PPO critic steps and the embedded engine's prefill and
decode; DPO's steps) for the slice's devices and mesh, with abstract arguments: no weights, no data, no TPU.
One row per program: per-chip arguments, outputs, temporaries and code, the run's other buffers resident on the
device meanwhile (e.g. the train state while the engine decodes), the total against the chip's HBM, the
headroom and the FLOPs per chip (`cost_analysis`, which counts a loop body once). A program XLA refuses (out of memory at compile time) is
reported with XLA's message. Exit status 1 when any program does not fit or leaves less than
`--min_headroom` (10%) of HBM free, 2 on a usage error.

The device platform is `cpu` unless JAX_PLATFORMS says otherwise: libtpu serves only as a compiler here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported: libtpu compiles, nothing runs on a TPU

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from retool_jax import sharding as sharding_lib  # noqa: E402
from retool_jax import topologies  # noqa: E402
from retool_jax.programs import resident_bytes  # noqa: E402
from retool_jax.train import check_config  # noqa: E402

GiB = 1024**3

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Run config file (configs/NAME.py), as for `python -m retool_jax.train`.", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
  "topology", "v5p-8", "TPU slice (v5p-8, v5e-16, ...) or libtpu topology (v5p:2x2x1)."
)
_JSON = flags.DEFINE_string(
  "json", "", "Also write the rows as JSON to this file ('-': stdout instead of the table)."
)
_DUMP_HLO = flags.DEFINE_string(
  "dump_hlo", "", "Write each program's StableHLO and compiled HLO into this folder."
)
_ONLY = flags.DEFINE_string("only", "", "Compile only the programs whose name matches this regular expression.")
_LIST = flags.DEFINE_bool("list", False, "List the programs and their argument shapes without compiling.")
_MIN_HEADROOM = flags.DEFINE_float("min_headroom", 0.10, "Smallest acceptable free fraction of HBM per program.")


@dataclasses.dataclass
class Row:
  """One compiled program's figures per chip (bytes), or the reason it did not compile."""

  program: str
  status: str  # ok | tight (fits, under the headroom) | oom | error
  hbm_bytes: int
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  resident_bytes: int = 0  # other buffers the run keeps on the device meanwhile (see `Program.resident`)
  flops: float = 0.0
  compile_s: float = 0.0
  message: str = ""

  @property
  def total_bytes(self) -> int:
    """Peak HBM of one call: arguments and outputs (donated buffers counted once), temporaries, code and the
    run's other resident buffers."""
    own = self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    return own + self.resident_bytes

  @property
  def headroom(self) -> float:
    return 1.0 - self.total_bytes / self.hbm_bytes

  def to_json(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), total_bytes=self.total_bytes, headroom=self.headroom)


def _xla_message(e: Exception) -> str:
  text = str(e).strip()
  first = next((line for line in text.splitlines() if line.strip()), text)
  return first[:400]


def compile_program(program, hbm_bytes: int, *, min_headroom: float = 0.10, dump_dir: str = "") -> Row:
  """Lowers and compiles `program` (a `retool_jax.programs.Program`) and reads its memory and cost analysis."""
  resident = resident_bytes(program)
  t0 = time.perf_counter()
  try:
    lowered = program.lower()
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001  (XLA refusing a program is a result, not a crash)
    message = _xla_message(e)
    status = "oom" if "RESOURCE_EXHAUSTED" in message or "memory" in message.lower() else "error"
    return Row(
      program.name, status, hbm_bytes, resident_bytes=resident, compile_s=time.perf_counter() - t0, message=message
    )
  elapsed = time.perf_counter() - t0
  if dump_dir:
    folder = Path(dump_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", program.name)
    (folder / f"{stem}.stablehlo.mlir").write_text(lowered.as_text())
    (folder / f"{stem}.hlo.txt").write_text(compiled.as_text())
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  row = Row(
    program.name,
    "ok",
    hbm_bytes,
    argument_bytes=int(mem.argument_size_in_bytes),
    output_bytes=int(mem.output_size_in_bytes),
    alias_bytes=int(mem.alias_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    code_bytes=int(mem.generated_code_size_in_bytes),
    resident_bytes=resident,
    flops=float((cost or {}).get("flops", 0.0)),
    compile_s=elapsed,
  )
  if row.total_bytes > hbm_bytes:
    row.status, row.message = "oom", "the program needs more than the chip's HBM"
  elif row.headroom < min_headroom:
    row.status, row.message = "tight", f"under {min_headroom:.0%} of HBM left"
  return row


def format_table(rows: Sequence[Row], title: str = "") -> str:
  """The rows as a Markdown table: GiB per chip (`resident`: the run's other buffers on the device meanwhile);
  TFLOP per chip as XLA's cost analysis counts them (a loop body, e.g. scanned layers, once)."""

  def gib(n: int) -> str:
    return f"{n / GiB:.2f}"

  lines = [title] if title else []
  lines.append(
    "| program | args | outputs | aliased | temps | resident | total | HBM | headroom | TFLOP | compile s | status |"
  )
  lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  for r in rows:
    if r.status in ("ok", "tight") or r.argument_bytes:
      figures = [gib(r.argument_bytes), gib(r.output_bytes), gib(r.alias_bytes), gib(r.temp_bytes)]
      figures.append(gib(r.resident_bytes))
      figures += [gib(r.total_bytes), gib(r.hbm_bytes), f"{r.headroom:.0%}", f"{r.flops / 1e12:.2f}"]
    else:
      figures = ["-"] * 4 + [gib(r.resident_bytes), "-", gib(r.hbm_bytes), "-", "-"]
    status = r.status if not r.message else f"{r.status}: {r.message}"
    lines.append(f"| {r.program} | " + " | ".join(figures) + f" | {r.compile_s:.1f} | {status} |")
  return "\n".join(lines)


def run_programs(
  config, topology: str, *, only: str = "", min_headroom: float = 0.10, dump_hlo: str = "", progress=None
) -> tuple[list[Row], Any]:
  """Compiles the programs of `config` for `topology`; returns the rows and the `Topology`."""
  trainer = check_config(config)
  if not hasattr(trainer, "programs"):
    raise ValueError(f"config.trainer={config.trainer!r} does not list its programs (no `programs(config, mesh)`)")
  topo = topologies.get(topology)
  devices = topologies.devices(topo)
  hbm = topologies.hbm_bytes_per_device(topo, len(devices))
  mesh = sharding_lib.make_mesh(**config.mesh.to_dict(), devices=devices)
  rows = []
  programs = trainer.programs(config, mesh)  # outside the mesh context: optimizer init builds small arrays
  if only:
    programs = [p for p in programs if re.search(only, p.name)]
  with jax.set_mesh(mesh):  # the trainers trace their steps under the run's mesh
    for p in programs:
      row = compile_program(p, hbm, min_headroom=min_headroom, dump_dir=dump_hlo)
      rows.append(row)
      if progress is not None:
        progress(row)
  return rows, topo


def list_programs(config, topology: str) -> list[str]:
  """`name: argument shapes` of each program, without compiling."""
  trainer = check_config(config)
  devices = topologies.devices(topologies.get(topology))
  mesh = sharding_lib.make_mesh(**config.mesh.to_dict(), devices=devices)
  out = []
  for p in trainer.programs(config, mesh):
    leaves = [x for x in jax.tree.leaves((p.args, p.kwargs)) if isinstance(x, jax.ShapeDtypeStruct)]
    big = sorted(leaves, key=lambda x: -x.size)[:4]
    shapes = ", ".join(f"{x.dtype}{list(x.shape)}" for x in big)
    out.append(f"{p.name}: {len(leaves)} arrays, largest {shapes}")
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  try:
    topologies.get(_TOPOLOGY.value)
    if _LIST.value:
      print("\n".join(list_programs(config, _TOPOLOGY.value)))
      return
    to_stdout = _JSON.value != "-"
    if to_stdout:
      print(f"compiling for {_TOPOLOGY.value} (mesh {dict(config.mesh)}) ...", flush=True)

    def progress(row: Row) -> None:
      if to_stdout:
        print(
          f"  {row.program}: {row.status} ({row.total_bytes / GiB:.1f} GiB, {row.compile_s:.0f} s)", flush=True
        )

    rows, topo = run_programs(
      config,
      _TOPOLOGY.value,
      only=_ONLY.value,
      min_headroom=_MIN_HEADROOM.value,
      dump_hlo=_DUMP_HLO.value,
      progress=progress,
    )
  except (ValueError, ImportError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not rows:
    print(f"error: no program matches --only={_ONLY.value!r}", file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    record = {"topology": topo.name, "libtpu_topology": topo.topology, "rows": [r.to_json() for r in rows]}
    text = json.dumps(record, indent=2)
    if _JSON.value == "-":
      print(text)
    else:
      Path(_JSON.value).write_text(text + "\n")
  if _JSON.value != "-":
    hbm = rows[0].hbm_bytes / GiB
    print(format_table(rows, f"\n{topo.name} ({topo.topology}, {hbm:.1f} GiB HBM per chip), per chip:\n"))
  bad = [r for r in rows if r.status != "ok"]
  if bad:
    names = ", ".join(f"{r.program} ({r.status})" for r in bad)
    print(f"\nDOES NOT FIT with {_MIN_HEADROOM.value:.0%} headroom: {names}", file=sys.stderr)
    sys.exit(1)
  if _JSON.value != "-":
    print(f"\nevery program fits with at least {_MIN_HEADROOM.value:.0%} of HBM free")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
