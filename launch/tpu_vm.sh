#!/usr/bin/env bash
# Runs one latent_em job on a fresh Cloud TPU VM, copies its log back and deletes the VM.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR_TYPE [--dry-run] [--skip-preflight] -- \
#       --config=configs/X.py --workdir=DIR [--config.a.b=v ...]
#
# First, here, the fit check (python -m latent_em.tools.preflight, needs `pip install -e
# '.[tpu]'`) compiles the job for ACCELERATOR_TYPE's topology; if it does not fit, or the check
# cannot run, nothing is created (--skip-preflight launches without it).
# Every worker of the slice runs `python -m latent_em.main ARGS` (in a Python 3.11 virtualenv,
# with --config.distributed=on: jax.distributed finds the other workers through the TPU
# metadata server). On a multi-host slice DIR must be shared by all workers (a gs:// bucket).
#
# Environment:
#   RUNTIME_VERSION  TPU software version (default: the base image for ACCELERATOR_TYPE)
#   PROJECT          gcloud project (default: gcloud's configured one)
#   SPOT=1           create a Spot VM
#   GCS_WORKDIR      when ARGS have no --workdir, use --workdir=$GCS_WORKDIR/NAME
#   REPO_URL         git clone this on the workers (REPO_REF: branch or tag) instead of copying
#                    latent_em/, configs/ and setup.py from this checkout
#   LOG_DIR          where the log (and a non-gs:// workdir) come back (default: launch_logs/NAME)
#   PYTHON_VERSION   Python of the workers' virtualenv (default 3.11)
#   KEEP=1           keep the VM afterwards (it is deleted on exit otherwise, failures included)
#   PYTHON           interpreter here for the fit check (default: python)
# --dry-run prints every command instead of running it.
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 3 ]] || usage
NAME=$1 ZONE=$2 ACCELERATOR_TYPE=$3
shift 3
DRY_RUN=0 PREFLIGHT=1
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --skip-preflight) PREFLIGHT=0 ;;
    *) echo "tpu_vm.sh: unknown option '$1' (arguments for latent_em.main go after --)" >&2
       exit 2 ;;
  esac
  shift
done
[[ $# -gt 0 ]] && shift  # the --
ARGS=("$@")

run() { if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

# --config.distributed=on goes right after --config= (config_flags rejects overrides before
# it, and a later --config.distributed=... from ARGS still wins): "auto" only recognises
# env-var clusters, while a TPU VM describes its workers through its metadata server.
MAIN_ARGS=() WORKDIR="" HAS_CONFIG=0
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  MAIN_ARGS+=("${ARGS[i]}")
  case ${ARGS[i]} in
    --config=*) HAS_CONFIG=1; MAIN_ARGS+=(--config.distributed=on) ;;
    --workdir=*) WORKDIR=${ARGS[i]#--workdir=} ;;
    --workdir) WORKDIR=${ARGS[i + 1]:-} ;;
  esac
done
if [[ -z $WORKDIR && -n ${GCS_WORKDIR:-} ]]; then
  WORKDIR=${GCS_WORKDIR%/}/$NAME
  MAIN_ARGS+=("--workdir=$WORKDIR")
fi
if [[ -z $WORKDIR || $HAS_CONFIG == 0 ]]; then
  echo "tpu_vm.sh: give --config=configs/X.py and --workdir=DIR (or set GCS_WORKDIR) after --" >&2
  exit 2
fi

case $ACCELERATOR_TYPE in
  v5litepod-*|v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION=${RUNTIME_VERSION:-$default_runtime}
LOG_DIR=${LOG_DIR:-launch_logs/$NAME}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=latent_em       # relative to each worker's home directory
REMOTE_LOG=latent_em.log
# shellcheck disable=SC2088  # the tilde is for the workers' shell, not this one
REMOTE_VENV='~/latent_em_venv'
PYTHON_VERSION=${PYTHON_VERSION:-3.11}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then WHERE+=(--project="$PROJECT"); fi
CREATE=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ ${SPOT:-0} == 1 ]]; then CREATE+=(--spot); fi

# The fit check, before anything is created: the same config arguments (the check reads the
# workdir only for a tokenizer that sizes the vocabulary).
if [[ $PREFLIGHT == 1 ]]; then
  set +e
  run "${PYTHON:-python}" -m latent_em.tools.preflight --topology="$ACCELERATOR_TYPE" "${ARGS[@]}"
  rc=$?
  set -e
  if [[ $rc == 1 ]]; then
    echo "tpu_vm.sh: the job does not fit $ACCELERATOR_TYPE (report above); nothing was created." \
      "Change the config (e.g. --config.train.grad_accum, --config.mesh.shape) or a bigger" \
      "slice, or launch anyway with --skip-preflight" >&2
    exit 1
  elif [[ $rc != 0 ]]; then
    echo "tpu_vm.sh: the fit check could not run (above); nothing was created. Install it here" \
      "with pip install -e '.[tpu]', or launch without it: --skip-preflight" >&2
    exit "$rc"
  fi
fi

cleanup() {
  local rc=$?
  set +e  # fetch what we can and always reach the delete
  run mkdir -p "$LOG_DIR"
  run "${TPU[@]}" scp "$NAME:$REMOTE_LOG" "$LOG_DIR/" --worker=0 "${WHERE[@]}"
  if [[ $WORKDIR != gs://* ]]; then
    local remote_workdir=$WORKDIR
    [[ $WORKDIR == /* ]] || remote_workdir=$REMOTE_DIR/$WORKDIR  # main ran inside REMOTE_DIR
    run "${TPU[@]}" scp --recurse "$NAME:$remote_workdir" "$LOG_DIR/" --worker=0 "${WHERE[@]}"
  fi
  if [[ ${KEEP:-0} == 1 ]]; then
    echo "tpu_vm.sh: kept $NAME; delete it with: ${TPU[*]} delete $NAME ${WHERE[*]} --quiet" >&2
  else
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # so that the EXIT trap also runs on Ctrl-C / kill

run "${TPU[@]}" create "$NAME" "${WHERE[@]}" "${CREATE[@]}"

if [[ -n ${REPO_URL:-} ]]; then
  clone=(git clone --depth=1)
  if [[ -n ${REPO_REF:-} ]]; then clone+=(--branch "$REPO_REF"); fi
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
    --command="$(printf '%q ' "${clone[@]}" "$REPO_URL" "$REMOTE_DIR")"
else
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="mkdir -p $REMOTE_DIR"
  run "${TPU[@]}" scp --recurse "$REPO_ROOT/latent_em" "$REPO_ROOT/configs" "$REPO_ROOT/setup.py" \
    "$NAME:$REMOTE_DIR/" --worker=all "${WHERE[@]}"
fi

# jax 0.10 needs Python >= 3.11, newer than the TPU images' system Python: uv fetches one into
# a virtualenv. jax[tpu] brings the libtpu that matches the jax version setup.py allows.
pip_uv="python3 -m pip install -q --user uv"
setup="($pip_uv || $pip_uv --break-system-packages)"
setup+=" && python3 -m uv venv -q --python $PYTHON_VERSION $REMOTE_VENV && cd $REMOTE_DIR"
setup+=" && python3 -m uv pip install -q --python $REMOTE_VENV/bin/python -e . 'jax[tpu]'"
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$setup"

main_cmd="$REMOTE_VENV/bin/python $(printf '%q ' -m latent_em.main "${MAIN_ARGS[@]}")"
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command="set -o pipefail; cd $REMOTE_DIR && PYTHONUNBUFFERED=1 ${main_cmd}2>&1 \
| tee ../$REMOTE_LOG"
