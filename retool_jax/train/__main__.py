"""Training entry point: `python -m retool_jax.train --config=configs/NAME.py [--config.key=value ...]`.

The config's `trainer` field picks the trainer; the config is checked against that trainer's schema
(`default_config()`) before anything runs, so a mistyped field fails at once with its name.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training config file (configs/NAME.py).", lock_config=True
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from retool_jax.sharding import initialize_distributed
  from retool_jax.train import check_config, run

  config = _CONFIG.value
  try:
    check_config(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  initialize_distributed()
  run(config)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
