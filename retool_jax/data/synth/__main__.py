"""`python -m retool_jax.data.synth`: write synthetic tool-use conversations as `{"messages", "tools"}` jsonl.

    python -m retool_jax.data.synth templates --out synth.jsonl --n 200 --format qwen
    python -m retool_jax.data.synth teacher --gsm8k gsm8k/train.jsonl --loss my_module:loss_fn --out teacher.jsonl

`--loss` names a callable `loss(prefix: str, continuation: str) -> float` (mean NLL of the continuation under
the teacher model, e.g. one made by `retool_jax.data.synth.model_loss(model, tokenizer)`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from retool_jax.data.chat_sft import dumps_example
from retool_jax.data.math_datasets import load_gsm8k
from retool_jax.data.synth.teacher import gsm8k_item, table_proposer, teacher_examples
from retool_jax.data.synth.templates import FORMATS, templated_examples
from retool_jax.tools import default_registry


def _callable(spec: str):
  module, _, name = spec.partition(":")
  if not name:
    raise SystemExit(f"--loss must look like 'package.module:function', got {spec!r}")
  return getattr(importlib.import_module(module), name)


def _write(path: Path, examples) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for example in examples:
      f.write(dumps_example(example) + "\n")
  print(f"wrote {len(examples)} conversations to {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m retool_jax.data.synth", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="mode", required=True)
  t = sub.add_parser("templates", help="templated conversations, every tool call executed")
  t.add_argument("--out", type=Path, required=True)
  t.add_argument("--n", type=int, default=100)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--format", choices=FORMATS, default="qwen")
  k = sub.add_parser("teacher", help="keep only the GSM8K calculations that lower a teacher model's loss")
  k.add_argument("--gsm8k", type=Path, required=True, help="GSM8K json/jsonl/parquet file")
  k.add_argument("--loss", required=True, help="module:function computing loss(prefix, continuation)")
  k.add_argument("--out", type=Path, required=True)
  k.add_argument("--threshold", type=float, default=0.1)
  k.add_argument("--limit", type=int, default=None)
  args = parser.parse_args(argv)

  registry = default_registry()
  if args.mode == "templates":
    _write(args.out, templated_examples(registry, args.n, seed=args.seed, fmt=args.format))
    return
  problems = load_gsm8k(args.gsm8k, limit=args.limit)
  items, propose = table_proposer(
    gsm8k_item(e.metadata["problem"], e.metadata["solution"], e.ground_truth) for e in problems
  )
  _write(args.out, teacher_examples(items, propose, registry, _callable(args.loss), threshold=args.threshold))


if __name__ == "__main__":
  main()
