#!/usr/bin/env bash
# Put grpo_jax on every worker of a TPU VM and install it (venv + requirements + jax[tpu]).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/setup.sh --name NAME --zone ZONE [options]

On every worker (--worker=all): copy this checkout (or git clone a URL), create a
Python venv, pip install -r requirements.txt plus jax[tpu] at the version pinned in
requirements.txt, then print each worker's TPU devices.

  --name NAME            TPU name (env TPU_NAME)
  --zone ZONE            its zone (env TPU_ZONE)
  --project PROJECT      GCP project (env GCP_PROJECT)
  --remote-dir DIR       where the repo goes on the workers (default: ~/grpo_jax; env GRPO_JAX_REMOTE_DIR)
  --repo-url URL         git clone URL on the workers instead of copying this checkout
  --ref REF              with --repo-url: branch or tag to check out
  --python PY            Python >= 3.11 on the workers (default: python3.11; installed with apt if missing)
  --jax-version V        jax[tpu] version (default: the jax pin in requirements.txt)
  --skip-code            only (re)install the environment
  --dry-run              print the commands instead of running them
  -h, --help             this help

The copy is a tarball of this working tree without .venv, .git, runs/ and caches
(uncommitted edits included), sent with `gcloud compute tpus tpu-vm scp --worker=all`.
USAGE
}

REPO_URL=""
REF=""
PYTHON="python3.11"
JAX_VERSION=""
SKIP_CODE=0

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
    --repo-url) [[ $# -ge 2 ]] || die "$1 needs a value"; REPO_URL="$2"; shift 2 ;;
    --ref) [[ $# -ge 2 ]] || die "$1 needs a value"; REF="$2"; shift 2 ;;
    --python) [[ $# -ge 2 ]] || die "$1 needs a value"; PYTHON="$2"; shift 2 ;;
    --jax-version) [[ $# -ge 2 ]] || die "$1 needs a value"; JAX_VERSION="$2"; shift 2 ;;
    --skip-code) SKIP_CODE=1; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require_name_zone
[[ -z "$REF" || -n "$REPO_URL" ]] || die "--ref needs --repo-url"
JAX_VERSION="${JAX_VERSION:-$(pinned_jax_version)}"
[[ -n "$JAX_VERSION" ]] || die "no jax==VERSION line in requirements.txt; pass --jax-version"
DIR="$(quote "$REMOTE_DIR")"

# 1. the code
if ((!SKIP_CODE)); then
  if [[ -n "$REPO_URL" ]]; then
    branch=""
    [[ -z "$REF" ]] || branch="--branch $(quote "$REF") "
    ssh_all "if [ -d $DIR/.git ]; then git -C $DIR pull --ff-only; else git clone --depth 1 ${branch}$(quote "$REPO_URL") $DIR; fi"
  else
    tarball="${TMPDIR:-/tmp}/grpo_jax-$TPU_NAME.tar.gz"
    run tar -czf "$tarball" -C "$GRPO_JAX_ROOT" --exclude=./.venv --exclude=./.git --exclude=./runs \
      --exclude=./.cache --exclude=__pycache__ --exclude=.pytest_cache .
    run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:grpo_jax.tar.gz" "${ZONE_FLAGS[@]}" --worker=all
    ssh_all "mkdir -p $DIR && tar -xzf grpo_jax.tar.gz -C $DIR && rm grpo_jax.tar.gz"
  fi
fi

# 2. the environment (same pins as everywhere else, plus the TPU build of the same jax)
PY="$(quote "$PYTHON")"
ssh_all "set -e; cd $DIR; \
if ! command -v $PY >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $PY $PY-venv; fi; \
[ -x .venv/bin/python ] || $PY -m venv .venv; \
.venv/bin/pip install -q --upgrade pip; \
.venv/bin/pip install -q -r requirements.txt \"jax[tpu]==$JAX_VERSION\"; \
.venv/bin/python -c \"import jax; print(jax.devices()[0].device_kind, jax.local_device_count())\""
