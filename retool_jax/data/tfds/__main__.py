"""Prepares a dataset from local files, without TensorFlow (the stock `tfds build` command needs it).

python -m retool_jax.data.tfds gsm8k --manual_dir data/gsm8k --data_dir /gcs/my-bucket/tfds
python -m retool_jax.data.tfds dapo_math_17k --config retool --file train=dapo.parquet --data_dir ~/tfds
"""

from __future__ import annotations

import argparse
import sys

from retool_jax.data.tfds.builders import BUILDERS, prepare


def _file(value: str) -> tuple[str, str]:
  split, sep, path = value.partition("=")
  if not sep or not split or not path:
    raise argparse.ArgumentTypeError(f"expected SPLIT=PATH, got {value!r}")
  return split, path


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m retool_jax.data.tfds", description=__doc__.splitlines()[0])
  parser.add_argument("name", choices=sorted(BUILDERS))
  parser.add_argument("--data_dir", required=True, help="where to write the dataset (local or gcsfuse-mounted)")
  parser.add_argument("--manual_dir", help="the directory holding <split>.jsonl|.json|.parquet")
  parser.add_argument("--config", help="a config name of the builder (default: its default config)")
  parser.add_argument(
    "--file",
    type=_file,
    action="append",
    default=[],
    metavar="SPLIT=PATH",
    help="a split's file, absolute or relative to --manual_dir; names a custom config --config",
  )
  parser.add_argument("--prompt_style", help="math datasets: the prompt style of a custom config")
  args = parser.parse_args(argv)
  builder_cls = BUILDERS[args.name]
  config = args.config
  if args.file or args.prompt_style:
    config_cls = type(builder_cls.BUILDER_CONFIGS[0])
    options = {"prompt_style": args.prompt_style} if args.prompt_style else {}
    if options and not hasattr(config_cls, "prompt_style"):
      parser.error(f"{args.name} has no prompt styles")
    if not args.config or args.config in builder_cls.builder_configs:
      parser.error("a config with --file or --prompt_style needs a new --config name")
    config = config_cls(name=args.config, files=dict(args.file), **options)
  builder = prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir, config=config)
  splits = ", ".join(f"{name}: {info.num_examples}" for name, info in builder.info.splits.items())
  print(f"{builder.data_dir} ({splits})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
