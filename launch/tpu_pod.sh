#!/usr/bin/env bash
# Creates a Cloud TPU VM pod, ships this repository to every worker, installs it and runs one command on all of
# them (the program calls jax.distributed.initialize() through retool_jax.sharding.initialize_distributed()).
#
#   launch/tpu_pod.sh create --name retool --zone us-east5-a --accelerator-type v5p-64
#   launch/tpu_pod.sh run --name retool --zone us-east5-a -- python3 -m retool_jax.train --config=configs/X.py
#   launch/tpu_pod.sh run --detach --run-name exp1 --name retool --zone us-east5-a -- python3 -m ...
#   launch/tpu_pod.sh logs --name retool --zone us-east5-a --worker all --follow   # the latest detached run
#   launch/tpu_pod.sh status --name retool --zone us-east5-a    # running / exited with code, per worker
#   launch/tpu_pod.sh ssh --name retool --zone us-east5-a --worker 0
#   launch/tpu_pod.sh stop --name retool --zone us-east5-a      # ends the run on every worker
#   launch/tpu_pod.sh delete --name retool --zone us-east5-a    # releases the pod
#
# `run --detach` starts the program on every worker under `setsid nohup`, with its output in
# ~/LOG_DIR/RUN-worker-I.log, and returns at once: the run survives the laptop's connection.
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
            (in the foreground of the ssh session; with --detach in the background, logging to a file)
  logs      print (or --follow) the log of a detached run on one worker or all of them
  status    per worker: whether a detached run is running or exited, and its exit code
  ssh       open a shell on one worker (or run `-- command` there)
  stop      stop the command `run` started (and the latest detached run), on every worker, and confirm
            (pods cannot be stopped, only deleted)
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
  --detach                  start the program under setsid nohup on every worker and return at once
run --detach, logs, status, stop:
  --run-name RUN            names the detached run and its logs (default for run: run-UTCDATE-TIME;
                            default for the others: the latest run started on each worker)
  --log-dir DIR             log directory on the workers, relative to home (default retool_jax_logs)
logs:
  --worker N|all            which worker's log (default 0)
  --lines N                 how many lines to print (default 100)
  --follow                  keep printing as the log grows (tail -f)
ssh:
  --worker N                worker index (default 0)
USAGE
}

[[ $# -gt 0 ]] || fail "missing subcommand"
subcommand="$1"
shift
case "$subcommand" in
  create|run|logs|status|ssh|stop|delete) ;;
  -h|--help) usage; exit 0 ;;
  -*) fail "missing subcommand (create, run, logs, status, ssh, stop or delete) before '$subcommand'" ;;
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
detach=0
run_name=""
log_dir=retool_jax_logs
lines=100
follow=0
worker=""
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
    --detach) detach=1; shift ;;
    --run-name) need "$@"; run_name="$2"; shift 2 ;;
    --log-dir) need "$@"; log_dir="$2"; shift 2 ;;
    --lines) need "$@"; lines="$2"; shift 2 ;;
    --follow) follow=1; shift ;;
    --worker) need "$@"; worker="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; command=("$@"); break ;;
    *) fail "unknown argument '$1'" ;;
  esac
done

[[ -n "$name" ]] || fail "--name is required"
[[ -n "$zone" ]] || fail "--zone is required"
[[ -n "$worker" ]] || worker=0
if [[ "$subcommand" != logs || "$worker" != all ]]; then
  [[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be a non-negative integer, got '$worker'"
fi
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines must be a non-negative integer, got '$lines'"
[[ "$remote_dir" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--remote-dir '$remote_dir' may only hold letters, digits, . _ / -"
[[ "$log_dir" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--log-dir '$log_dir' may only hold letters, digits, . _ / -"
if [[ -n "$run_name" ]]; then
  [[ "$run_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-name '$run_name' may only hold letters, digits, . _ -"
fi

tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then
  where+=(--project "$project")
fi
pid_file=".retool_jax_run.pid"
metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes

# on_all_workers SHELL_COMMAND: runs one remote shell command on every worker at once.
on_all_workers() {
  print_or_run "$dry_run" "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$1"
}

# detached_snippet ACTION: the worker-side shell code of a detached run, for ACTION start, status, logs or stop.
# Each worker finds its index (TPU_WORKER_ID, else the TPU VM metadata, as JAX does) and keeps its files in
# ~/LOG_DIR: RUN-worker-I.log (the output), .pid (the process group, from setsid), .exit (the exit code, written
# by the wrapper when the program ends), and `latest` (the name of the last run started there).
# shellcheck disable=SC2016  # the single-quoted code expands on the worker
detached_snippet() {
  local s=(
    'i="${TPU_WORKER_ID:-$(curl -sf -H Metadata-Flavor:Google '"$metadata"'/agent-worker-number)}"'
    '[ -n "$i" ] || { echo "cannot tell the index of this worker" >&2; exit 1; }'
    "dir=\"\$HOME/$log_dir\""
  )
  if [[ -n "$run_name" ]]; then
    s+=("run=$run_name")
  else
    s+=('run="$(cat "$dir/latest" 2>/dev/null)"')
  fi
  s+=(
    '[ -n "$run" ] || { echo "worker $i: no detached run in $dir"; exit 0; }'
    'base="$dir/$run-worker-$i"'
  )
  case "$1" in
    start)
      # setsid: a new session and process group (stop signals the group); nohup: deaf to the ssh hangup. The
      # wrapper's TERM trap keeps it alive until the program ends, to record the exit code.
      s+=(
        '[ ! -e "$base.log" ] || { echo "worker $i: run $run exists ($base.log); pick another --run-name" >&2; exit 1; }'
        "cd $remote_dir || exit 1"
        'mkdir -p "$dir" && echo "$run" > "$dir/latest"'
        "wrapper=$(shell_quote 'trap true TERM; "$@"; echo $? > "$0.exit"')"
        'setsid nohup bash -c "$wrapper" "$base" '"$(shell_quote "${command[@]}")"' > "$base.log" 2>&1 < /dev/null &'
        'echo $! > "$base.pid"'
        'echo "worker $i: started $run (process group $(cat "$base.pid")), log $base.log"'
      )
      ;;
    status)
      s+=(
        'if [ -f "$base.exit" ]; then echo "worker $i: $run exited with code $(cat "$base.exit")"'
        'elif [ ! -f "$base.pid" ]; then echo "worker $i: no run $run"'
        'elif kill -0 "$(cat "$base.pid")" 2>/dev/null; then echo "worker $i: $run running (process group $(cat "$base.pid"))"'
        'else echo "worker $i: $run ended without an exit code (killed)"; fi'
      )
      ;;
    logs)
      local tail="tail -n $lines"
      if [[ "$follow" == 1 ]]; then tail+=" -f"; fi
      if [[ "$worker" == all ]]; then
        s+=("$tail"' "$base.log" | awk -v p="[worker $i] " '\''{ print p $0; fflush() }'\''')
      else
        s+=("$tail"' "$base.log"')
      fi
      ;;
    stop)
      # TERM to the process group; up to 30 s for the exit code to be written (or the group to be gone), then KILL.
      s+=(
        '[ -f "$base.pid" ] && [ ! -f "$base.exit" ] || { echo "worker $i: $run is not running"; exit 0; }'
        'pg="$(cat "$base.pid")"'
        'kill -TERM -- "-$pg" 2>/dev/null'
        'n=0'
        'while [ ! -f "$base.exit" ] && kill -0 -- "-$pg" 2>/dev/null && [ $n -lt 150 ]; do sleep 0.2; n=$((n + 1)); done'
        'if [ -f "$base.exit" ] || ! kill -0 -- "-$pg" 2>/dev/null; then echo "worker $i: stopped $run"'
        'else kill -KILL -- "-$pg" 2>/dev/null; echo "worker $i: killed $run (it ignored TERM for 30 s)"; fi'
      )
      ;;
  esac
  join_statements "${s[@]}"
}

# join_statements STATEMENT...: one shell line, the statements separated by `; ` (none after a trailing `&`).
join_statements() {
  local line="" statement
  for statement in "$@"; do
    if [[ -z "$line" || "$line" == *'&' ]]; then line+="${line:+ }$statement"; else line+="; $statement"; fi
  done
  printf '%s\n' "$line"
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
    if [[ "$detach" == 1 ]]; then
      [[ -n "$run_name" ]] || run_name="run-$(date -u +%Y%m%d-%H%M%S)"
      on_all_workers "$(detached_snippet start)"
      if [[ "$dry_run" == 0 ]]; then
        echo "$script: started $run_name; see it with: $0 logs|status|stop --name $name --zone $zone --run-name $run_name" >&2
      fi
      exit 0
    fi
    # The remote shell records its pid, then becomes the program: `stop` ends exactly that process.
    on_all_workers "cd $(printf '%q' "$remote_dir") && echo \$\$ > ~/$pid_file && exec $(printf '%q ' "${command[@]}")"
    ;;
  logs)
    run_or_print "$dry_run" "${tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker" --command "$(detached_snippet logs)"
    ;;
  status)
    on_all_workers "$(detached_snippet status)"
    ;;
  ssh)
    cmd=("${tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker")
    if [[ ${#command[@]} -gt 0 ]]; then
      cmd+=(--command "$(printf '%q ' "${command[@]}")")
    fi
    run_or_print "$dry_run" "${cmd[@]}"
    ;;
  stop)
    # Without --run-name: the foreground run and the latest detached one; with it: that detached run.
    foreground="if [ -f ~/$pid_file ]; then kill \"\$(cat ~/$pid_file)\" 2>/dev/null || true; rm -f ~/$pid_file; fi"
    if [[ -n "$run_name" ]]; then
      on_all_workers "$(detached_snippet stop)"
    else
      on_all_workers "$foreground; $(detached_snippet stop)"
    fi
    ;;
  delete)
    run_or_print "$dry_run" "${tpu[@]}" delete "$name" "${where[@]}" --quiet
    ;;
esac
