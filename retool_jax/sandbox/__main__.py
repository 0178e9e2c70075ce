"""Run code in the sandbox from the command line.

python -m retool_jax.sandbox --code 'print(2**10)'
echo 'import sympy; sympy.factorint(360)' | python -m retool_jax.sandbox --timeout 5
"""

from __future__ import annotations

import argparse
import json
import sys

from retool_jax.sandbox.limits import Limits
from retool_jax.sandbox.remote import create_sandbox


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m retool_jax.sandbox", description=__doc__.splitlines()[0])
  parser.add_argument("--code", help="Python code to run (default: read standard input)")
  parser.add_argument("--command", help="a shell command to run instead of Python code")
  parser.add_argument("--backend", default="auto", choices=["auto", "bwrap", "process", "remote"])
  parser.add_argument("--url", help="service address for --backend remote")
  parser.add_argument("--timeout", type=float, default=10.0, help="wall-time limit in seconds")
  parser.add_argument("--memory-mb", type=int, default=1024, help="memory limit in MiB")
  parser.add_argument("--max-output-bytes", type=int, default=8192)
  parser.add_argument("--no-policy", action="store_true", help="disable the module allow-list")
  parser.add_argument("--json", action="store_true", help="print the result as JSON")
  args = parser.parse_args(argv)

  limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb, max_output_bytes=args.max_output_bytes)
  kwargs = {"limits": limits}
  if args.no_policy:
    kwargs["policy"] = None
  if args.backend == "remote":
    kwargs["url"] = args.url
  else:
    kwargs.update(max_workers=1, preload=())
  sandbox = create_sandbox(args.backend, **kwargs)
  try:
    if args.command is not None:
      result = sandbox.run_command(args.command)
    else:
      code = args.code if args.code is not None else sys.stdin.read()
      result = sandbox.run(code)
  finally:
    sandbox.close()
  if args.json:
    print(
      json.dumps(
        {
          "status": result.status,
          "output": result.output,
          "elapsed_s": result.elapsed_s,
          "backend": result.backend,
        }
      )
    )
  else:
    sys.stdout.write(result.output)
    if result.status != "ok":
      print(f"[{result.status}]", file=sys.stderr)
  return 0 if result.ok else 1


if __name__ == "__main__":
  sys.exit(main())
