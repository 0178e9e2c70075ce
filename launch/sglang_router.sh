#!/usr/bin/env bash
# Starts an sglang-router in front of running SGLang servers (one per data-parallel replica).
#
#   launch/sglang_router.sh --worker-urls http://10.0.0.1:30000 http://10.0.0.2:30000 --port 30080 [--dry-run]
#
# Generation goes through the router; give the same worker URLs to SGLangEngine(worker_urls=...) so weight
# updates reach every worker. Anything after `--` is passed to sglang_router.launch_router unchanged.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: sglang_router.sh --worker-urls URL [URL ...] [options] [-- extra sglang_router.launch_router flags]
  --worker-urls URL...   SGLang servers to route to (required)
  --policy NAME          cache_aware | round_robin | random | power_of_two (default cache_aware)
  --host HOST            bind address (default 127.0.0.1)
  --port PORT            (default 30080)
  --python PYTHON        interpreter that has sglang-router installed (default python3)
  --dry-run              print the command instead of running it
USAGE
}

workers=()
policy=cache_aware
host=127.0.0.1
port=30080
python=python3
dry_run=0
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker-urls)
      shift
      while [[ $# -gt 0 && "$1" != --* ]]; do
        workers+=("$1")
        shift
      done
      ;;
    --policy) need "$@"; policy="$2"; shift 2 ;;
    --host) need "$@"; host="$2"; shift 2 ;;
    --port) need "$@"; port="$2"; shift 2 ;;
    --python) need "$@"; python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) fail "unknown argument '$1'" ;;
  esac
done

if [[ ${#workers[@]} -eq 0 ]]; then
  fail "--worker-urls needs at least one URL"
fi
for url in "${workers[@]}"; do
  if ! [[ "$url" =~ ^https?:// ]]; then
    die "worker URL '$url' must start with http:// or https://"
  fi
done
case "$policy" in
  cache_aware|round_robin|random|power_of_two) ;;
  *) die "unknown --policy '$policy'" ;;
esac

cmd=("$python" -m sglang_router.launch_router
  --worker-urls "${workers[@]}"
  --policy "$policy"
  --host "$host"
  --port "$port")
cmd+=("${extra[@]}")

run_or_print "$dry_run" "${cmd[@]}"
