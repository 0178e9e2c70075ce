#!/usr/bin/env bash
# Creates a Cloud TPU VM pod, ships this repository to every worker, installs it and runs one command on all of
# them (the program calls jax.distributed.initialize() through retool_jax.sharding.initialize_distributed()).
#
#   launch/tpu_pod.sh create --name retool --zone us-east5-a --accelerator-type v5p-64
#   launch/tpu_pod.sh run --name retool --zone us-east5-a -- python3 -m retool_jax.train --config=configs/X.py
#   launch/tpu_pod.sh ssh --name retool --zone us-east5-a --worker 0
#   launch/tpu_pod.sh stop --name retool --zone us-east5-a      # ends the run on every worker
#   launch/tpu_pod.sh delete --name retool --zone us-east5-a    # releases the pod
#
# Every subcommand takes --dry-run, which prints the commands instead of running them.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_pod.sh SUBCOMMAND --name NAME --zone ZONE [options] [-- command]
subcommands:
  create    create the TPU VM (pod slice)
  run       ship the code, install it, and run `-- command` on every worker
  ssh       open a shell on one worker (or run `-- command` there)
  stop      stop the command `run` started, on every worker (pods cannot be stopped, only deleted)
  delete    delete the TPU VM
options:
  --name NAME               TPU VM name (required)
  --zone ZONE               e.g. us-east5-a (required)
  --project PROJECT         Google Cloud project (default: gcloud's configured one)
  --dry-run                 print the commands instead of running them
create:
  --accelerator-type TYPE   e.g. v4-32, v5p-64, v5litepod-16, v6e-32 (required)
  --version VERSION         TPU software version (default: the usual one for TYPE's generation)
  --spot                    a Spot (preemptible) VM
run:
  --git URL                 clone URL on the workers instead of copying this checkout
  --ref REF                 branch, tag or commit of --git (default main)
  --no-ship                 use the code already on the workers
  --no-install              skip `pip install -e .[tpu]`
  --remote-dir DIR          code directory on the workers, relative to home (default retool_jax)
ssh:
  --worker N                worker index (default 0)
USAGE
}

[[ $# -gt 0 ]] || fail "missing subcommand"
subcommand="$1"
shift
case "$subcommand" in
  create|run|ssh|stop|delete) ;;
  -h|--help) usage; exit 0 ;;
  -*) fail "missing subcommand (create, run, ssh, stop or delete) before '$subcommand'" ;;
  *) fail "unknown subcommand '$subcommand'" ;;
esac

name=""
zone=""
project=""
dry_run=0
accelerator_type=""
version=""
spot=0
git_url=""
ref=main
ship=1
install=1
remote_dir=retool_jax
worker=0
command=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$@"; name="$2"; shift 2 ;;
    --zone) need "$@"; zone="$2"; shift 2 ;;
    --project) need "$@"; project="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --accelerator-type) need "$@"; accelerator_type="$2"; shift 2 ;;
    --version) need "$@"; version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --git) need "$@"; git_url="$2"; shift 2 ;;
    --ref) need "$@"; ref="$2"; shift 2 ;;
    --no-ship) ship=0; shift ;;
    --no-install) install=0; shift ;;
    --remote-dir) need "$@"; remote_dir="$2"; shift 2 ;;
    --worker) need "$@"; worker="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; command=("$@"); break ;;
    *) fail "unknown argument '$1'" ;;
  esac
done

[[ -n "$name" ]] || fail "--name is required"
[[ -n "$zone" ]] || fail "--zone is required"
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be a non-negative integer, got '$worker'"
[[ "$remote_dir" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--remote-dir '$remote_dir' may only hold letters, digits, . _ / -"

tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then
  where+=(--project "$project")
fi
pid_file=".retool_jax_run.pid"

# on_all_workers SHELL_COMMAND: runs one remote shell command on every worker at once.
on_all_workers() {
  print_or_run "$dry_run" "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$1"
}

default_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default --version for accelerator type '$1'; pass --version" ;;
  esac
}

ship_code() {
  if [[ -n "$git_url" ]]; then
    on_all_workers "$(printf 'set -e; [ -d %q/.git ] || git clone --quiet %q %q; git -C %q fetch --quiet origin %q; git -C %q checkout --quiet FETCH_HEAD' \
      "$remote_dir" "$git_url" "$remote_dir" "$remote_dir" "$ref" "$remote_dir")"
    return
  fi
  local repo archive
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  archive="${TMPDIR:-/tmp}/retool_jax-$name.tar.gz"
  print_or_run "$dry_run" tar -czf "$archive" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
    -C "$repo" .
  print_or_run "$dry_run" "${tpu[@]}" scp "$archive" "$name:retool_jax.tar.gz" "${where[@]}" --worker=all
  on_all_workers "$(printf 'set -e; mkdir -p %q && tar -xzf retool_jax.tar.gz -C %q' "$remote_dir" "$remote_dir")"
}

case "$subcommand" in
  create)
    [[ -n "$accelerator_type" ]] || fail "create needs --accelerator-type"
    [[ -n "$version" ]] || version="$(default_version "$accelerator_type")"
    cmd=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator_type" --version "$version")
    if [[ "$spot" == 1 ]]; then
      cmd+=(--spot)
    fi
    run_or_print "$dry_run" "${cmd[@]}"
    ;;
  run)
    [[ ${#command[@]} -gt 0 ]] || fail "run needs a command after --"
    if [[ "$ship" == 1 ]]; then
      ship_code
    fi
    if [[ "$install" == 1 ]]; then
      on_all_workers "$(printf 'set -e; cd %q && python3 -m pip install --quiet -e %q' "$remote_dir" '.[tpu]')"
    fi
    # The remote shell records its pid, then becomes the program: `stop` ends exactly that process.
    on_all_workers "cd $(printf '%q' "$remote_dir") && echo \$\$ > ~/$pid_file && exec $(printf '%q ' "${command[@]}")"
    ;;
  ssh)
    cmd=("${tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker")
    if [[ ${#command[@]} -gt 0 ]]; then
      cmd+=(--command "$(printf '%q ' "${command[@]}")")
    fi
    run_or_print "$dry_run" "${cmd[@]}"
    ;;
  stop)
    on_all_workers "if [ -f ~/$pid_file ]; then kill \"\$(cat ~/$pid_file)\" 2>/dev/null || true; rm -f ~/$pid_file; fi"
    ;;
  delete)
    run_or_print "$dry_run" "${tpu[@]}" delete "$name" "${where[@]}" --quiet
    ;;
esac
