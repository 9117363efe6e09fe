#!/usr/bin/env bash
# Shared by the launch/tpu scripts (sourced, not run): flag helpers and the dry-run runner.
#
# Every script takes --dry-run: it prints the exact commands (gcloud and local) it would
# run, one per line, shell-quoted so they can be pasted, and runs nothing.
# Defaults come from the environment: TPU_NAME, TPU_ZONE, GCP_PROJECT, GRPO_JAX_REMOTE_DIR.

# shellcheck disable=SC2034  # variables used by the scripts that source this file

set -euo pipefail

GRPO_JAX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DRY_RUN=0
TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
GCP_PROJECT="${GCP_PROJECT:-}"
QUEUED=0
# where the repo lives on every worker (relative paths are under the remote user's home)
REMOTE_DIR="${GRPO_JAX_REMOTE_DIR:-grpo_jax}"
GCLOUD="${GCLOUD:-gcloud}"

die() {
  echo "error: $*" >&2
  exit 2
}

# quote ARG: ARG as one shell word (left bare when it is safe)
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# show CMD...: the command line, quoted
show() {
  local out="" arg
  for arg in "$@"; do
    out+="$(quote "$arg") "
  done
  printf '%s\n' "${out% }"
}

# run CMD...: print it; unless --dry-run, run it (its exit status is the script's on failure)
run() {
  if ((DRY_RUN)); then
    show "$@"
  else
    printf '+ %s\n' "$(show "$@")" >&2
    "$@"
  fi
}

# flags every gcloud tpu call takes
zone_flags() {
  ZONE_FLAGS=("--zone=$TPU_ZONE")
  if [[ -n "$GCP_PROJECT" ]]; then
    ZONE_FLAGS+=("--project=$GCP_PROJECT")
  fi
}

require_name_zone() {
  [[ -n "$TPU_NAME" ]] || die "--name is required (or set TPU_NAME)"
  [[ -n "$TPU_ZONE" ]] || die "--zone is required (or set TPU_ZONE)"
  zone_flags
}

# parse_common FLAG [VALUE]: handle a flag every script takes; sets USED to the words it took (0: not ours)
parse_common() {
  USED=0
  case "$1" in
    --name | --zone | --project | --remote-dir)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --name) TPU_NAME="$2" ;;
        --zone) TPU_ZONE="$2" ;;
        --project) GCP_PROJECT="$2" ;;
        --remote-dir) REMOTE_DIR="$2" ;;
      esac
      USED=2
      ;;
    --dry-run) DRY_RUN=1 USED=1 ;;
    --queued) QUEUED=1 USED=1 ;;
  esac
}

# split_eq ARGS...: "--flag=value" -> "--flag" "value" (into the SPLIT array) up to a "--"; other words unchanged
split_eq() {
  SPLIT=()
  local arg rest=0
  for arg in "$@"; do
    if ((rest)); then
      SPLIT+=("$arg")
    elif [[ "$arg" == "--" ]]; then
      rest=1
      SPLIT+=("$arg")
    elif [[ "$arg" == --*=* ]]; then
      SPLIT+=("${arg%%=*}" "${arg#*=}")
    else
      SPLIT+=("$arg")
    fi
  done
}

# ssh_all COMMAND: run a shell command on every worker
ssh_all() {
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${ZONE_FLAGS[@]}" --worker=all --command="$1"
}

# the jax version pinned in requirements.txt (jax[tpu] must match it)
pinned_jax_version() {
  sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$GRPO_JAX_ROOT/requirements.txt" | head -n 1
}
