#!/usr/bin/env bash
# Stop a grpo_jax run on every worker: SIGTERM (the run finishes its step, saves a checkpoint, exits).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/stop.sh --name NAME --zone ZONE [options]

Sends SIGTERM to the process run.sh started on each worker (its pid is in
DIR/logs/<host>.pid): the run finishes the current step, saves a checkpoint and
exits; rerunning the same train command resumes it.

  --name NAME          TPU name (env TPU_NAME)
  --zone ZONE          its zone (env TPU_ZONE)
  --project PROJECT    GCP project (env GCP_PROJECT)
  --remote-dir DIR     the repo on the workers (default: ~/grpo_jax)
  --now                SIGKILL instead (no checkpoint)
  --vm                 also stop the TPU VM (single-host TPU VMs only; pods can only be deleted)
  --dry-run            print the commands instead of running them
  -h, --help           this help
USAGE
}

SIGNAL="TERM"
STOP_VM=0
split_eq "$@"
set -- ${SPLIT[@]+"${SPLIT[@]}"}
while [[ $# -gt 0 ]]; do
  parse_common "$@"
  if ((USED)); then
    shift "$USED"
    continue
  fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --now) SIGNAL="KILL"; shift ;;
    --vm) STOP_VM=1; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require_name_zone
DIR="$(quote "$REMOTE_DIR")"

ssh_all "f=$DIR/logs/\$(hostname).pid; if [ -f \$f ] && kill -0 \$(cat \$f) 2>/dev/null; then kill -$SIGNAL \$(cat \$f) && echo \"\$(hostname): sent SIG$SIGNAL\"; else echo \"\$(hostname): no run\"; fi"
if ((STOP_VM)); then
  run "$GCLOUD" compute tpus tpu-vm stop "$TPU_NAME" "${ZONE_FLAGS[@]}"
fi
