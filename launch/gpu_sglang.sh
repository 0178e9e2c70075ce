#!/usr/bin/env bash
# Serves rollouts on one GPU host: one SGLang server per group of --tp GPUs, and the router in front of them.
#
#   launch/gpu_sglang.sh --model-path /ckpt/hf/qwen3-4b --gpus 0,1,2,3,4,5,6,7 --tp 2 --host 0.0.0.0 [--dry-run]
#
# Servers listen on --base-port, --base-port + 1, ...; the router on --router-port. Give the router URL and the
# server URLs to SGLangEngine(url, worker_urls=...) so that weight updates reach every server. Servers log to
# --log-dir and stop when the router stops. Anything after `--` goes to every sglang.launch_server unchanged.
set -euo pipefail

here="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

usage() {
  cat <<'USAGE'
usage: gpu_sglang.sh --model-path PATH --gpus IDS [options] [-- extra sglang.launch_server flags]
  --model-path PATH          HF folder to serve (required)
  --gpus IDS                 comma-separated GPU ids to use, e.g. 0,1,2,3 (required)
  --tp N                     GPUs per server (tensor parallel); the GPUs split into groups of N (default 1)
  --host HOST                bind address of the servers and the router (default 127.0.0.1)
  --base-port PORT           port of the first server (default 30000)
  --router-port PORT         (default 30080)
  --policy NAME              router policy (default cache_aware)
  --deterministic            batch-invariant kernels on every server
  --no-router                start the servers only
  --log-dir DIR              server logs (default logs/sglang)
  --python PYTHON            interpreter that has sglang installed (default python3)
  --dry-run                  print the commands instead of running them
USAGE
}

model_path=""
gpus=""
tp=1
host=127.0.0.1
base_port=30000
router_port=30080
policy=cache_aware
deterministic=0
router=1
log_dir=logs/sglang
python=python3
dry_run=0
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model-path) need "$@"; model_path="$2"; shift 2 ;;
    --gpus) need "$@"; gpus="$2"; shift 2 ;;
    --tp) need "$@"; tp="$2"; shift 2 ;;
    --host) need "$@"; host="$2"; shift 2 ;;
    --base-port) need "$@"; base_port="$2"; shift 2 ;;
    --router-port) need "$@"; router_port="$2"; shift 2 ;;
    --policy) need "$@"; policy="$2"; shift 2 ;;
    --deterministic) deterministic=1; shift ;;
    --no-router) router=0; shift ;;
    --log-dir) need "$@"; log_dir="$2"; shift 2 ;;
    --python) need "$@"; python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) fail "unknown argument '$1'" ;;
  esac
done

[[ -n "$model_path" ]] || fail "--model-path is required"
[[ -n "$gpus" ]] || fail "--gpus is required"
[[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be comma-separated GPU ids, got '$gpus'"
for pair in "tp:$tp" "base-port:$base_port" "router-port:$router_port"; do
  if ! [[ "${pair#*:}" =~ ^[0-9]+$ ]] || [[ "${pair#*:}" -eq 0 ]]; then
    die "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
  fi
done
IFS=, read -r -a gpu_ids <<<"$gpus"
if (( ${#gpu_ids[@]} % tp != 0 )); then
  die "--gpus has ${#gpu_ids[@]} GPUs, which do not split into groups of --tp $tp"
fi
num_servers=$(( ${#gpu_ids[@]} / tp ))

server_flags=(--model-path "$model_path" --tp "$tp" --host "$host" --python "$python")
if [[ "$deterministic" == 1 ]]; then
  server_flags+=(--deterministic)
fi

pids=()
stop_servers() {
  if [[ ${#pids[@]} -gt 0 ]]; then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}

urls=()
if [[ "$dry_run" == 0 ]]; then
  mkdir -p "$log_dir"
  trap stop_servers EXIT INT TERM
fi
for (( i = 0; i < num_servers; i++ )); do
  group="$(IFS=,; echo "${gpu_ids[*]:i*tp:tp}")"
  port=$(( base_port + i ))
  url_host="$host"
  [[ "$url_host" != 0.0.0.0 ]] || url_host=127.0.0.1
  urls+=("http://$url_host:$port")
  if [[ "$dry_run" == 1 ]]; then
    # The server script checks its flags and prints the command it would run.
    printf 'CUDA_VISIBLE_DEVICES=%s ' "$group"
    "$here/sglang_server.sh" "${server_flags[@]}" --port "$port" --dry-run -- "${extra[@]}"
  else
    CUDA_VISIBLE_DEVICES="$group" "$here/sglang_server.sh" "${server_flags[@]}" --port "$port" -- "${extra[@]}" \
      >"$log_dir/server_$i.log" 2>&1 &
    pids+=("$!")
    echo "$script: server $i on GPUs $group at ${urls[-1]} (log $log_dir/server_$i.log)" >&2
  fi
done

if [[ "$router" == 0 ]]; then
  if [[ "$dry_run" == 0 ]]; then
    wait "${pids[@]}"
  fi
  exit 0
fi
router_cmd=("$here/sglang_router.sh" --worker-urls "${urls[@]}" --policy "$policy" --host "$host"
  --port "$router_port" --python "$python")
if [[ "$dry_run" == 1 ]]; then
  "${router_cmd[@]}" --dry-run
else
  "${router_cmd[@]}"
fi
