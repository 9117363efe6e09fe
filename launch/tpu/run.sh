#!/usr/bin/env bash
# Run a grpo_jax command on every worker of a TPU VM at once, collecting each worker's log locally.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/run.sh --name NAME --zone ZONE [options] [-- COMMAND... | -- --section.key=value...]

Runs the same command on all workers (--worker=all), as multi-host JAX needs: each
worker's process finds the others through the TPU metadata (grpo_jax.distributed).

  --name NAME          TPU name (env TPU_NAME)
  --zone ZONE          its zone (env TPU_ZONE)
  --project PROJECT    GCP project (env GCP_PROJECT)
  --remote-dir DIR     the repo on the workers (default: ~/grpo_jax; env GRPO_JAX_REMOTE_DIR)
  --config FILE        run `python -m launch train --config FILE` (default: configs/demo.yaml)
  --env KEY=VALUE      set an environment variable for the command (repeatable)
  --log-dir DIR        local folder for the logs, one file per worker (default: tpu-logs/NAME)
  --worker W           all (default), or a worker index / list for debugging
  --detach             start in the background (nohup) and return; fetch logs later with --fetch-logs
  --fetch-logs         only copy the workers' logs (DIR/logs/*) into --log-dir
  --dry-run            print the commands instead of running them
  -h, --help           this help

After `--`: a full command (`-- python -m launch plan --devices 8`), or config
overrides appended to the train command (`-- --mesh.fsdp=8 --run.steps=200`).
`python` runs the workers' venv. Logs also stay on each worker in DIR/logs/.

Examples:
  launch/tpu/run.sh --name grpo-v5e --zone us-west4-a --config configs/demo.yaml -- --mesh.fsdp=8
  launch/tpu/run.sh --name grpo-v5p --zone us-east5-a --detach --config configs/demo.yaml \
      --env GRPO_JAX_HEARTBEAT_TIMEOUT=300 -- --mesh.fsdp=32 --run.output_dir=gs://my-bucket/runs/v5p
USAGE
}

CONFIG="configs/demo.yaml"
ENVS=()
LOG_DIR=""
WORKER="all"
DETACH=0
FETCH_ONLY=0
COMMAND=()

split_eq "$@"
set -- ${SPLIT[@]+"${SPLIT[@]}"}
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--" ]]; then
    shift
    COMMAND=("$@")
    break
  fi
  parse_common "$@"
  if ((USED)); then
    shift "$USED"
    continue
  fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --config) [[ $# -ge 2 ]] || die "$1 needs a value"; CONFIG="$2"; shift 2 ;;
    --env)
      [[ $# -ge 2 && "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env needs KEY=VALUE"
      ENVS+=("$2")
      shift 2
      ;;
    --log-dir) [[ $# -ge 2 ]] || die "$1 needs a value"; LOG_DIR="$2"; shift 2 ;;
    --worker) [[ $# -ge 2 ]] || die "$1 needs a value"; WORKER="$2"; shift 2 ;;
    --detach) DETACH=1; shift ;;
    --fetch-logs) FETCH_ONLY=1; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require_name_zone
LOG_DIR="${LOG_DIR:-tpu-logs/$TPU_NAME}"
DIR="$(quote "$REMOTE_DIR")"

if ((FETCH_ONLY)); then
  run mkdir -p "$LOG_DIR"
  run "$GCLOUD" compute tpus tpu-vm scp "$TPU_NAME:$REMOTE_DIR/logs/*" "$LOG_DIR/" "${ZONE_FLAGS[@]}" --worker="$WORKER"
  exit 0
fi

# the command every worker runs
if [[ ${#COMMAND[@]} -eq 0 || "${COMMAND[0]}" == --* ]]; then
  COMMAND=(python -m launch train --config "$CONFIG" ${COMMAND[@]+"${COMMAND[@]}"})
fi
if [[ "${COMMAND[0]}" == python || "${COMMAND[0]}" == python3 ]]; then
  COMMAND[0]=".venv/bin/python"
fi
cmd_line="$(show "${COMMAND[@]}")"
exports=""
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  exports+="export ${kv%%=*}=$(quote "${kv#*=}"); "
done
log="logs/\$(hostname).log"  # expanded on each worker
if ((DETACH)); then
  remote="cd $DIR && mkdir -p logs && ${exports}nohup $cmd_line > $log 2>&1 < /dev/null & echo \$! > logs/\$(hostname).pid"
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${ZONE_FLAGS[@]}" --worker="$WORKER" --command="$remote"
  echo "started on worker(s) $WORKER; logs: $0 --name $TPU_NAME --zone $TPU_ZONE --fetch-logs; stop: launch/tpu/stop.sh" >&2
else
  remote="set -o pipefail; cd $DIR && mkdir -p logs && ${exports}{ $cmd_line & echo \$! > logs/\$(hostname).pid; wait \$!; } 2>&1 | tee $log"
  run mkdir -p "$LOG_DIR"
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${ZONE_FLAGS[@]}" --worker="$WORKER" --command="$remote" \
    --output-directory="$LOG_DIR"
  ((DRY_RUN)) || echo "logs: $LOG_DIR/<worker>.log" >&2
fi
