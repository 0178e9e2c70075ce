#!/usr/bin/env bash
# Runs one command as N JAX processes on this machine, as if on N hosts: JAX's coordinator on a free localhost
# port, CPU devices per process, CPU collectives over gloo. Each line of output is prefixed with its process
# ("[p0] ..."); when one process fails the others are stopped and the script exits with the failure's status.
#
#   launch/local_multihost.sh 2 -- python -m retool_jax.train --config=configs/sft_tiny.py
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $script [--devices-per-process K] [--port P] [--platform cpu|PLATFORM] [--dry-run] N -- COMMAND [ARGS...]

Starts COMMAND N times with JAX_COORDINATOR_ADDRESS=127.0.0.1:P, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=0..N-1.
  --devices-per-process K  CPU devices of each process (default: \$DEVICES_PER_PROCESS or 4)
  --port P                 coordinator port (default: \$COORDINATOR_PORT or a free one)
  --platform NAME          JAX_PLATFORMS of the processes (default: cpu; another platform keeps its devices)
  --dry-run                print each process's environment and command instead of running them
EOF
}

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  die "needs bash 5.1 or newer (this is $BASH_VERSION; on macOS: brew install bash)"
fi

devices="${DEVICES_PER_PROCESS:-4}"
port="${COORDINATOR_PORT:-}"
platform="cpu"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices-per-process) need "$@"; devices="$2"; shift 2 ;;
    --port) need "$@"; port="$2"; shift 2 ;;
    --platform) need "$@"; platform="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) fail "the number of processes comes before --" ;;
    -*) fail "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || fail "missing the number of processes"
num="$1"
shift
[[ "$num" =~ ^[1-9][0-9]*$ ]] || fail "the number of processes must be a positive integer, got '$num'"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || fail "--devices-per-process must be a positive integer, got '$devices'"
[[ $# -ge 1 && "$1" == "--" ]] || fail "expected -- before the command"
shift
[[ $# -ge 1 ]] || fail "missing the command after --"

if [[ -z "$port" ]]; then
  python="$(command -v python3 || command -v python)" || die "python3 is needed to pick a free port (or pass --port)"
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$port" =~ ^[0-9]+$ ]] || fail "--port must be a number, got '$port'"

export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port"
export JAX_NUM_PROCESSES="$num"
export JAX_PLATFORMS="$platform"
# processes sharing one machine can stall each other for a while (compilation, swapping): be patient with them
export RETOOL_HEARTBEAT_TIMEOUT_S="${RETOOL_HEARTBEAT_TIMEOUT_S:-600}"
if [[ "$platform" == cpu ]]; then
  export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
fi

if [[ "$dry_run" == 1 ]]; then
  vars=(JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PLATFORMS RETOOL_HEARTBEAT_TIMEOUT_S)
  [[ "$platform" != cpu ]] || vars+=(JAX_CPU_COLLECTIVES_IMPLEMENTATION XLA_FLAGS)
  for ((i = 0; i < num; i++)); do
    line=(env)
    for var in "${vars[@]}"; do
      line+=("$var=${!var}")
    done
    print_or_run 1 "${line[@]}" "JAX_PROCESS_ID=$i" "$@"
  done
  exit 0
fi

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  sleep 2
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < num; i++)); do
  JAX_PROCESS_ID="$i" "$@" > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=("$!")
done

status=0
live=("${pids[@]}")
while [[ ${#live[@]} -gt 0 ]]; do
  code=0
  finished=""
  wait -n -p finished "${live[@]}" || code=$?
  still=()
  for pid in "${live[@]}"; do
    [[ "$pid" == "$finished" ]] || still+=("$pid")
  done
  live=("${still[@]}")
  if [[ "$code" -ne 0 ]]; then
    echo "$script: a process (pid ${finished:-?}) exited with status $code; stopping the others" >&2
    status="$code"
    stop_all
    break
  fi
done
wait 2>/dev/null || true
exit "$status"
