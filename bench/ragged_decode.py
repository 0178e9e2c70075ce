"""Ragged against dense blockwise attention for one decode step over a KV cache, one run, on this host.

A batch of rows whose cache lengths are one long row (`--length`) and short ones (uniform up to
`--short-max`), then a uniform batch (every row `--length`): the dense schedule visits every key block the
longest row needs for every row; the ragged one visits each row's own blocks. Outputs must be bitwise equal;
reported: milliseconds per call and the ratio ragged / dense for both batches.

    python bench/ragged_decode.py [--rows 64] [--length 4096] [--short-max 512] [--block 512] [--iters 10]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from retool_jax.models.blockwise_attention import blockwise_attention  # noqa: E402


def _time_ms(f, args, iters: int) -> float:
  f(*args).block_until_ready()
  start = time.perf_counter()
  for _ in range(iters):
    f(*args).block_until_ready()
  return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--length", type=int, default=4096)
  p.add_argument("--short-max", type=int, default=512)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--iters", type=int, default=10)
  a = p.parse_args()
  rng = np.random.default_rng(0)
  b, s, heads, kv, h = a.rows, a.length + 1, 16, 8, 128
  q = jnp.asarray(rng.normal(size=(b, 1, heads, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, s, kv, h)), jnp.float32) for _ in range(2))
  run = {
    r: jax.jit(
      lambda q, k, v, a_, c, d, r=r: blockwise_attention(
        q, k, v, a_, c, d, block_q=a.block, block_k=a.block, ragged=r
      )
    )
    for r in (False, True)
  }
  skewed = rng.integers(1, a.short_max, size=b)
  skewed[0] = a.length
  print(f"decode step: {b} rows, {heads} heads / {kv} KV heads x {h}, cache {s}, key block {a.block}, float32")
  for name, lens in (("one long row", skewed), ("uniform", np.full(b, a.length))):
    mask = (
      jnp.ones((b, 1), jnp.int32),
      jnp.asarray(np.arange(s)[None] <= lens[:, None], jnp.int32),
      jnp.asarray(lens[:, None], jnp.int32),
    )
    dense, ragged = (run[r](q, k, v, *mask) for r in (False, True))
    assert bool(jnp.all(dense == ragged)), "ragged output differs from the dense schedule"
    ms = {r: _time_ms(run[r], (q, k, v, *mask), a.iters) for r in (False, True)}
    print(
      f"{name:>14}: dense {ms[False]:8.2f} ms   ragged {ms[True]:8.2f} ms   ratio {ms[True] / ms[False]:.2f}x   (bitwise equal)"
    )


if __name__ == "__main__":
  main()
