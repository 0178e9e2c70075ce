"""`python -m retool_jax.serve`: an OpenAI-compatible HTTP server on the embedded engine (or an SGLang server).

    python -m retool_jax.serve --checkpoint runs/demo_cpu/rl/checkpoints --port 8000
    python -m retool_jax.serve --checkpoint ckpt/qwen3-4b-hf --sglang-url http://localhost:30000

The checkpoint is an Orbax checkpoint, a Hugging Face folder or a run folder; its prompt contract decides the
tokenizer, system prompt, whether tool schemas are rendered, the call formats and thinking, as in
`python -m retool_jax.chat` (flags override them). The model loads in the background: `/health` and every
request answer 503 until it is ready. Clients: `openai.OpenAI(base_url="http://localhost:8000/v1",
api_key="none")`; the served model's name is `--model-name` (default: the checkpoint folder's name).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import uvicorn

from retool_jax.chat.parse import FORMATS
from retool_jax.chat.prompt_contract import OBSERVATION_FORMATS, ContractError, check_tokenizer_fits, find_contract
from retool_jax.chat.tokenizer import load_tokenizer
from retool_jax.chat_cli import load_model, model_shape, settings_from, tokenizer_dir
from retool_jax.rollout import JaxEngine, SGLangEngine
from retool_jax.serve.app import create_app
from retool_jax.serve.backend import ServeBackend, ServeSettings

__all__ = ["build_backend", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m retool_jax.serve", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", help="an Orbax checkpoint, a Hugging Face folder or a run folder")
  p.add_argument("--tokenizer", help="tokenizer folder (default: the prompt contract's, else the checkpoint's)")
  p.add_argument("--sglang-url", help="generate on this SGLang server instead of in-process")
  p.add_argument("--dtype", default=None, help="parameter / compute dtype, e.g. bfloat16 (default: checkpoint's)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--model-name", default=None, help="the served model's id (default: the checkpoint's name)")
  p.add_argument("--max-batch-size", type=int, default=16, help="sequences the engine decodes at once")
  p.add_argument("--max-pending", type=int, default=256, help="sequences in flight or queued; beyond: 429")
  p.add_argument(
    "--admission-window-ms", type=float, default=10.0, help="an idle engine gathers requests this far apart"
  )
  p.add_argument("--temperature", type=float, default=1.0, help="default when a request sets none")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--max-new-tokens", type=int, default=1024, help="default reply length when a request sets none")
  p.add_argument("--max-context", type=int, default=None, help="prompt + reply tokens (default: the model's)")
  p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None, help="let the model think")
  p.add_argument("--system", default=None, help="system prompt for requests without one")
  p.add_argument("--tools-in-prompt", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--call-formats", default=None, help=f"comma-separated tool-call formats, some of {FORMATS}")
  p.add_argument("--observation-format", default=None, choices=OBSERVATION_FORMATS)
  args = p.parse_args(argv)
  if not args.checkpoint and not args.sglang_url:
    p.error("give --checkpoint (a model folder) or --sglang-url (a running server) with --tokenizer")
  if min(args.max_batch_size, args.max_pending, args.max_new_tokens) < 1 or not 0 < args.port < 65536:
    p.error("--max-batch-size, --max-pending, --max-new-tokens and --port must be positive")
  if args.call_formats is not None:
    args.call_formats = tuple(f.strip() for f in args.call_formats.split(",") if f.strip())
    unknown = sorted(set(args.call_formats) - set(FORMATS)) or ([] if args.call_formats else ["(none)"])
    if unknown:
      p.error(f"--call-formats: unknown format(s) {unknown}; expected some of {FORMATS}")
  # the chat's settings builder reads these too
  args.no_confirm, args.timeout = True, 30.0
  return args


def served_name(checkpoint: str | os.PathLike) -> str:
  """The folder's name, or its run's for a step or `checkpoints` folder (`runs/demo/rl/checkpoints/40` -> `rl`)."""
  path = Path(checkpoint).resolve()
  while path.parent != path and (path.name.isdigit() or path.name == "checkpoints"):
    path = path.parent
  return path.name or "policy"


def build_backend(args: argparse.Namespace) -> Callable[[], ServeBackend]:
  """Reads the prompt contract and the tokenizer now (a bad one is an error before the server starts) and
  returns what loads the model and the engine (run in the background while `/health` says loading)."""
  contract = find_contract(args.checkpoint) if args.checkpoint else None
  tok_dir = tokenizer_dir(args.checkpoint, args.tokenizer, contract)
  tokenizer = load_tokenizer(tok_dir)
  max_positions = None
  if args.checkpoint:
    vocab_size, max_positions = model_shape(args.checkpoint)
    check_tokenizer_fits(tokenizer, vocab_size, tokenizer_name=os.fspath(tok_dir), model_name=args.checkpoint)
  chat = settings_from(args, contract, max_positions)
  settings = ServeSettings(
    chat.multiturn(), system=chat.system, tools_in_prompt=chat.tools_in_prompt, max_pending=args.max_pending
  )
  name = args.model_name or (served_name(args.checkpoint) if args.checkpoint else "policy")

  def load() -> ServeBackend:
    if args.sglang_url:
      engine = SGLangEngine(args.sglang_url)
      asyncio.run(engine.start())  # waits for the server (meanwhile /health says loading)
    else:
      model = load_model(args.checkpoint, args.dtype)
      engine = JaxEngine(
        model, tokenizer=tokenizer, max_length=chat.max_context, max_batch_size=args.max_batch_size
      )
    return ServeBackend(engine, tokenizer, settings, model_name=name)

  return load


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  try:
    load = build_backend(args)
  except (ContractError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  uvicorn.run(create_app(load=load), host=args.host, port=args.port, log_level="info")
