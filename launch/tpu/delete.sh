#!/usr/bin/env bash
# Delete a TPU VM (or the queued resource holding it). Billing stops when this finishes.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/delete.sh --name NAME --zone ZONE [options]

  --name NAME          TPU name (env TPU_NAME)
  --zone ZONE          its zone (env TPU_ZONE)
  --project PROJECT    GCP project (env GCP_PROJECT)
  --queued             it was made with create.sh --queued: delete the queued resource (and its TPU)
  --async              return without waiting for the deletion
  --dry-run            print the commands instead of running them
  -h, --help           this help

Checkpoints on the workers' disks are lost with the VM: write them to a bucket
(--run.output_dir=gs://...) or copy them off first.
USAGE
}

ASYNC=()
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
    --async) ASYNC=(--async); shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require_name_zone

if ((QUEUED)); then
  run "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${ZONE_FLAGS[@]}" --force --quiet ${ASYNC[@]+"${ASYNC[@]}"}
else
  run "$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME" "${ZONE_FLAGS[@]}" --quiet ${ASYNC[@]+"${ASYNC[@]}"}
fi
