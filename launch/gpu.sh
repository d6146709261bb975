#!/usr/bin/env bash
# Runs latent_em on GPUs: on this node, or on several nodes through SLURM.
#
#   launch/gpu.sh [--dry-run] [--preflight] -- --config=configs/X.py --workdir=DIR [...]
#   launch/gpu.sh --slurm NODES GPUS_PER_NODE [--dry-run] -- --config=configs/X.py --workdir=DIR
#
# One process drives all GPUs of its node. --slurm submits launch/slurm.sbatch, which starts one
# process per node with srun (DIR must then be on a filesystem every node sees). --preflight
# first compiles the job for this node's GPUs and prints its memory per device (the fit check,
# python -m latent_em.tools.preflight --topology=local); the job starts only if it fits.
# Run it from the repository root (config paths are relative to it).
#
# Environment:
#   XLA_FLAGS    appended to --xla_gpu_enable_latency_hiding_scheduler=true (a later flag wins)
#   PYTHON       interpreter (default: python)
#   SBATCH_ARGS  extra sbatch options, e.g. "--partition=gpu --time=24:00:00 --account=X"
#   JOB_NAME     SLURM job name (default: latent_em)
# --dry-run prints the command instead of running it.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
DRY_RUN=0 NODES="" GPUS_PER_NODE="" PREFLIGHT=0
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --preflight) PREFLIGHT=1 ;;
    --slurm)
      [[ $# -ge 3 ]] || usage
      NODES=$2 GPUS_PER_NODE=$3
      shift 2 ;;
    -h|--help) usage ;;
    *) echo "gpu.sh: unknown option '$1' (arguments for latent_em.main go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ $# -gt 0 ]] && shift  # the --
[[ $# -gt 0 ]] || usage

run() { if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

if [[ $PREFLIGHT == 1 && -n $NODES ]]; then
  echo "gpu.sh: --preflight compiles for this node's GPUs; run it on a GPU node without --slurm" >&2
  exit 2
fi

if [[ -n $NODES ]]; then
  read -ra extra <<< "${SBATCH_ARGS:-}"
  # slurm.sbatch adds the XLA flags and the jax.distributed environment on the nodes.
  run sbatch --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS_PER_NODE" \
    --job-name="${JOB_NAME:-latent_em}" --export="ALL,GPUS_PER_NODE=$GPUS_PER_NODE" \
    ${extra[@]+"${extra[@]}"} "$(dirname "${BASH_SOURCE[0]}")/slurm.sbatch" "$@"
else
  # Lets XLA overlap collectives (data/fsdp all-reduces, all-gathers) with compute.
  xla="--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
  if [[ $PREFLIGHT == 1 ]]; then
    # Exits 1 when the job does not fit (set -e stops here), 2 when it cannot be checked.
    run env XLA_FLAGS="$xla" "${PYTHON:-python}" -m latent_em.tools.preflight --topology=local "$@"
  fi
  run env XLA_FLAGS="$xla" "${PYTHON:-python}" -m latent_em.main "$@"
fi
