#!/usr/bin/env bash
# Starts an SGLang server for RL rollouts: token ids in, log-probs out, weights reloaded from disk.
#
#   launch/sglang_server.sh --model-path /ckpt/hf/qwen3-8b --tp 2 --port 30000 [--deterministic] [--dry-run]
#
# Anything after `--` is passed to sglang.launch_server unchanged.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: sglang_server.sh --model-path PATH [options] [-- extra sglang.launch_server flags]
  --model-path PATH          HF folder to serve (required)
  --tp N                     tensor-parallel size (default 1)
  --mem-fraction-static F    GPU memory fraction for weights + KV cache (default 0.8)
  --context-length N         max prompt + completion tokens (default: the model's own)
  --host HOST                bind address (default 127.0.0.1)
  --port PORT                (default 30000)
  --random-seed N            (default 0)
  --enable-deterministic-inference, --deterministic
                             batch-invariant kernels: the same log-probs whatever the batch
  --python PYTHON            interpreter that has sglang installed (default python3)
  --dry-run                  print the command instead of running it
USAGE
}

model_path=""
tp=1
mem_fraction=0.8
context_length=""
host=127.0.0.1
port=30000
seed=0
deterministic=0
python=python3
dry_run=0
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model-path) need "$@"; model_path="$2"; shift 2 ;;
    --tp) need "$@"; tp="$2"; shift 2 ;;
    --mem-fraction-static) need "$@"; mem_fraction="$2"; shift 2 ;;
    --context-length) need "$@"; context_length="$2"; shift 2 ;;
    --host) need "$@"; host="$2"; shift 2 ;;
    --port) need "$@"; port="$2"; shift 2 ;;
    --random-seed) need "$@"; seed="$2"; shift 2 ;;
    --deterministic|--enable-deterministic-inference) deterministic=1; shift ;;
    --python) need "$@"; python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) fail "unknown argument '$1'" ;;
  esac
done

if [[ -z "$model_path" ]]; then
  fail "--model-path is required"
fi
for pair in "tp:$tp" "port:$port" "random-seed:$seed"; do
  if ! [[ "${pair#*:}" =~ ^[0-9]+$ ]]; then
    die "--${pair%%:*} must be a non-negative integer, got '${pair#*:}'"
  fi
done

cmd=("$python" -m sglang.launch_server
  --model-path "$model_path"
  --tp "$tp"
  --mem-fraction-static "$mem_fraction"
  --host "$host"
  --port "$port"
  --random-seed "$seed")
if [[ -n "$context_length" ]]; then
  cmd+=(--context-length "$context_length")
fi
if [[ "$deterministic" == 1 ]]; then
  cmd+=(--enable-deterministic-inference)
fi
cmd+=("${extra[@]}")

run_or_print "$dry_run" "${cmd[@]}"
