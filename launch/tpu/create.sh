#!/usr/bin/env bash
# Create a Cloud TPU VM (or a queued resource that becomes one) for grpo_jax.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/create.sh --name NAME --zone ZONE [options]

Create a TPU VM (all its workers) with the given accelerator type.

  --name NAME               TPU name (env TPU_NAME)
  --zone ZONE               e.g. us-west4-a for v5e, us-east5-a for v5p (env TPU_ZONE)
  --project PROJECT         GCP project (env GCP_PROJECT; default: gcloud's)
  --accelerator-type TYPE   v5litepod-8 (default), v5litepod-16, v5p-8, v5p-64, v6e-8, v4-32, ...
  --runtime-version V       TPU software version (default by type: v5litepod -> v2-alpha-tpuv5-lite,
                            v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e, else tpu-ubuntu2204-base)
  --spot                    spot capacity (cheaper, may be preempted at any time)
  --preemptible             legacy preemptible capacity (direct create only)
  --queued                  create through a queued resource and wait until it is ACTIVE
                            (the way to get large slices; also needed by delete.sh --queued)
  --valid-until D           with --queued: give up if not provisioned within D (e.g. 6h)
  --no-wait                 with --queued: return once the request is accepted
  --dry-run                 print the gcloud commands instead of running them
  -h, --help                this help

Examples:
  launch/tpu/create.sh --name grpo-v5e --zone us-west4-a --accelerator-type v5litepod-8 --spot
  launch/tpu/create.sh --name grpo-v5p --zone us-east5-a --accelerator-type v5p-64 --queued --spot
USAGE
}

ACCELERATOR="v5litepod-8"
RUNTIME=""
CAPACITY=""
VALID_UNTIL=""
WAIT=1

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
    --accelerator-type) [[ $# -ge 2 ]] || die "$1 needs a value"; ACCELERATOR="$2"; shift 2 ;;
    --runtime-version | --version) [[ $# -ge 2 ]] || die "$1 needs a value"; RUNTIME="$2"; shift 2 ;;
    --spot) CAPACITY="--spot"; shift ;;
    --preemptible) CAPACITY="--preemptible"; shift ;;
    --valid-until) [[ $# -ge 2 ]] || die "$1 needs a value"; VALID_UNTIL="$2"; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require_name_zone

if [[ -z "$RUNTIME" ]]; then
  case "$ACCELERATOR" in
    v5litepod-* | v5e-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
    *) RUNTIME="tpu-ubuntu2204-base" ;;
  esac
fi

if ((QUEUED)); then
  [[ "$CAPACITY" != "--preemptible" ]] || die "--preemptible is not available for queued resources; use --spot"
  cmd=("$GCLOUD" compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${ZONE_FLAGS[@]}"
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
  [[ -z "$CAPACITY" ]] || cmd+=("$CAPACITY")
  [[ -z "$VALID_UNTIL" ]] || cmd+=(--valid-until-duration="$VALID_UNTIL")
  run "${cmd[@]}"
  describe=("$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${ZONE_FLAGS[@]}"
    --format="value(state.state)")
  if ((DRY_RUN)); then
    echo "# then, every 30 s until it prints ACTIVE:"
    show "${describe[@]}"
  elif ((WAIT)); then
    while true; do
      state="$("${describe[@]}")"
      echo "queued resource $TPU_NAME: $state" >&2
      case "$state" in
        ACTIVE) break ;;
        FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state" ;;
      esac
      sleep 30
    done
  fi
else
  [[ -z "$VALID_UNTIL" ]] || die "--valid-until needs --queued"
  cmd=("$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "${ZONE_FLAGS[@]}"
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME")
  [[ -z "$CAPACITY" ]] || cmd+=("$CAPACITY")
  run "${cmd[@]}"
fi
