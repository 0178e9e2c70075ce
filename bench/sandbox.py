"""Sandbox latency and throughput against one fresh ``python3`` subprocess per call.

    python bench/sandbox.py [--backend auto|bwrap|process] [--quick]

Measures, in the same run, p50 / p99 latency of ``print(1)`` and of a small numpy + sympy snippet,
and throughput at concurrency 8 and 32, for the warm sandbox pool and for the baseline (a fresh
``python3 -c CODE`` per call, the way the public ReTool examples run code), and prints the ratios.
Goals: p50 <= 15 ms for ``print(1)``; throughput >= 5x the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

from retool_jax.sandbox import Sandbox

PRINT = "print(1)"
SNIPPET = (
  "import numpy as np\nimport sympy as sp\nx = sp.Symbol('x')\n"
  "roots = sp.solve(x**2 - 5*x + 6, x)\nm = np.arange(16.0).reshape(4, 4)\n"
  "print(roots, float(np.linalg.norm(m @ m.T)))"
)


def percentile(values: list[float], q: float) -> float:
  ordered = sorted(values)
  return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def baseline_call(code: str) -> str:
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
  return proc.stdout


async def baseline_call_async(code: str) -> str:
  proc = await asyncio.create_subprocess_exec(
    sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
  )
  out, _ = await proc.communicate()
  return out.decode()


def latencies(fn, code: str, n: int) -> list[float]:
  times = []
  for _ in range(n):
    start = time.perf_counter()
    out = fn(code)
    times.append(time.perf_counter() - start)
    if not out.strip():
      raise RuntimeError(f"empty output for {code!r}")
  return times


async def throughput(call, code: str, concurrency: int, total: int) -> float:
  sem = asyncio.Semaphore(concurrency)

  async def one():
    async with sem:
      return await call(code)

  start = time.perf_counter()
  outputs = await asyncio.gather(*(one() for _ in range(total)))
  elapsed = time.perf_counter() - start
  if not all(o.strip() for o in outputs):
    raise RuntimeError("a call produced no output")
  return total / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backend", default="auto")
  parser.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 2))
  parser.add_argument("--quick", action="store_true", help="fewer repetitions")
  args = parser.parse_args()
  scale = 0.25 if args.quick else 1.0
  n_fast, n_slow = max(20, int(200 * scale)), max(5, int(20 * scale))

  with Sandbox(args.backend, max_workers=args.workers) as sandbox:
    sandbox.warmup()

    def run_sync(code: str) -> str:
      res = sandbox.run(code)
      if res.status != "ok":
        raise RuntimeError(f"sandbox call failed: {res.status}: {res.output}")
      return res.output

    async def run_async(code: str) -> str:
      res = await sandbox.run_async(code)
      if res.status != "ok":
        raise RuntimeError(f"sandbox call failed: {res.status}: {res.output}")
      return res.output

    print(
      f"backend: {sandbox.backend_name}, workers: {sandbox.max_workers}, cpus: {os.cpu_count()}, "
      f"python: {sys.version.split()[0]}"
    )
    print(f"baseline: a fresh `{os.path.basename(sys.executable)} -c CODE` subprocess per call\n")
    print(f"{'latency':<26}{'sandbox p50':>12}{'p99':>10}{'baseline p50':>14}{'p99':>10}{'p50 ratio':>11}")
    for label, code, n in (("print(1)", PRINT, n_fast), ("numpy + sympy snippet", SNIPPET, n_slow)):
      ours = latencies(run_sync, code, n)
      base = latencies(baseline_call, code, max(5, n // 4))
      print(
        f"{label:<26}{percentile(ours, 50) * 1e3:>10.2f}ms{percentile(ours, 99) * 1e3:>8.2f}ms"
        f"{percentile(base, 50) * 1e3:>12.2f}ms{percentile(base, 99) * 1e3:>8.2f}ms"
        f"{statistics.median(base) / statistics.median(ours):>10.1f}x"
      )

    print(f"\n{'throughput (calls/s)':<40}{'sandbox':>10}{'baseline':>10}{'ratio':>8}")
    for label, code, per_level in (("print(1)", PRINT, 10), ("numpy + sympy snippet", SNIPPET, 1)):
      for concurrency in (8, 32):
        total = max(concurrency, int(concurrency * per_level * scale))
        ours = asyncio.run(throughput(run_async, code, concurrency, total * 4))
        base = asyncio.run(throughput(baseline_call_async, code, concurrency, total))
        print(f"{label + f' @ concurrency {concurrency}':<40}{ours:>10.1f}{base:>10.1f}{ours / base:>7.1f}x")


if __name__ == "__main__":
  main()
