# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).

script="$(basename "$0")"

# need FLAG VALUE...: fails unless FLAG was given a non-empty value.
need() {
  if [[ $# -lt 2 || -z "$2" ]]; then
    echo "$script: $1 needs a value" >&2
    exit 2
  fi
}

# die MESSAGE: prints the message and exits 2.
die() {
  echo "$script: $1" >&2
  exit 2
}

# fail MESSAGE: prints the message and the caller's usage, then exits 2.
fail() {
  echo "$script: $1" >&2
  usage >&2
  exit 2
}

# shell_quote WORD...: the words on one line, each one that needs it in single quotes (readable by any POSIX shell).
shell_quote() {
  local out=() word q="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/$q}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# run_or_print DRY_RUN CMD...: prints the shell-quoted command when DRY_RUN is 1, else replaces the shell with it.
run_or_print() {
  local dry_run="$1"
  shift
  if [[ "$dry_run" == 1 ]]; then
    shell_quote "$@"
    exit 0
  fi
  exec "$@"
}

# print_or_run DRY_RUN CMD...: prints the shell-quoted command when DRY_RUN is 1, else runs it; returns its status.
print_or_run() {
  local dry_run="$1"
  shift
  if [[ "$dry_run" == 1 ]]; then
    shell_quote "$@"
    return 0
  fi
  "$@"
}
