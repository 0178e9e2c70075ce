"""Checkpoint conversion command line.

    python -m retool_jax.convert --from hf --src HF_DIR --dst ORBAX_DIR [--dtype bfloat16]
    python -m retool_jax.convert --from megatron --src TORCH_DIST_DIR --hf-config CONFIG_JSON --dst ORBAX_DIR
    python -m retool_jax.convert --to hf --src ORBAX_DIR --dst HF_DIR [--tokenizer DIR]

Conversions stream one tensor at a time and publish the destination only once it is complete.
"""

from __future__ import annotations

import argparse
import sys

from retool_jax.checkpoint import converters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m retool_jax.convert",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n\n".join(__doc__.split("\n\n")[1:]),
  )
  direction = p.add_mutually_exclusive_group(required=True)
  direction.add_argument(
    "--from",
    dest="from_format",
    choices=("hf", "megatron"),
    help="convert a Hugging Face or Megatron-Core torch_dist checkpoint to Orbax",
  )
  direction.add_argument("--to", dest="to_format", choices=("hf",), help="convert an Orbax checkpoint to HF")
  p.add_argument("--src", required=True, help="source checkpoint folder")
  p.add_argument("--dst", required=True, help="destination folder (must not exist)")
  p.add_argument("--hf-config", help="the model's HF config.json (or its folder); needed with --from megatron")
  p.add_argument("--tokenizer", help="with --to hf: folder whose tokenizer files are copied to the destination")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast parameters to this dtype")
  p.add_argument("--max-shard-gb", type=float, default=4.0, help="with --to hf: safetensors shard size limit")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  if args.from_format == "megatron" and not args.hf_config:
    p.error("--from megatron needs --hf-config (the Hugging Face config.json of the model)")
  if args.hf_config and args.from_format != "megatron":
    p.error("--hf-config is only used with --from megatron")
  if args.tokenizer and not args.to_format:
    p.error("--tokenizer is only used with --to hf")
  return args


def run(args: argparse.Namespace) -> converters.ConversionSummary:
  progress = not args.no_progress
  if args.from_format == "hf":
    return converters.hf_to_orbax(args.src, args.dst, dtype=args.dtype, progress=progress)
  if args.from_format == "megatron":
    return converters.megatron_to_orbax(args.src, args.hf_config, args.dst, dtype=args.dtype, progress=progress)
  return converters.orbax_to_hf(
    args.src,
    args.dst,
    dtype=args.dtype,
    tokenizer=args.tokenizer,
    max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
    progress=progress,
  )


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    summary = run(args)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
