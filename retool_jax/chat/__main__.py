"""`python -m retool_jax.chat`: a terminal chat with tools (see `retool_jax.chat_cli`)."""

from retool_jax.chat_cli import run

if __name__ == "__main__":
  run()
