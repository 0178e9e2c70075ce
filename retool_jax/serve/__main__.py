"""`python -m retool_jax.serve` (see `retool_jax.serve.cli`)."""

from retool_jax.serve.cli import main

if __name__ == "__main__":
  main()
