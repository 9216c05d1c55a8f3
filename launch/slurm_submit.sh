#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch with the common knobs as flags.
#
# Usage: launch/slurm_submit.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P]
#                               [--time HH:MM:SS] [--account A] [--config FILE] --workdir DIR
#                               [-- --config.key=value ...]
# Everything after `--` is passed to mappa-train as config overrides. With --dry-run (or
# DRY_RUN=1) the sbatch command is printed instead of submitted. VENV, if set, is activated on
# every node.
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
nodes=2
gpus=8
partition=""
time_limit=""
account=""
config=configs/demo.py
workdir=""

die() {
  echo "slurm_submit.sh: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --nodes) need_value "$@"; nodes=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; gpus=$2; shift 2 ;;
    --partition) need_value "$@"; partition=$2; shift 2 ;;
    --time) need_value "$@"; time_limit=$2; shift 2 ;;
    --account) need_value "$@"; account=$2; shift 2 ;;
    --config) need_value "$@"; config=$2; shift 2 ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

[[ -n "$workdir" ]] || die "--workdir is required (a directory all nodes can write, or gs://)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$gpus'"

repo_root=$(cd "$(dirname "$0")/.." && pwd)
command=(sbatch --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus")
[[ -n "$partition" ]] && command+=(--partition="$partition")
[[ -n "$time_limit" ]] && command+=(--time="$time_limit")
[[ -n "$account" ]] && command+=(--account="$account")
command+=("$repo_root/launch/slurm_gpu.sbatch" "$@")

# sbatch exports the submitting environment to the job by default.
export CONFIG="$config" WORKDIR="$workdir" MAPPA_REPO="$repo_root"
if [[ "$DRY_RUN" == 1 ]]; then
  printf 'CONFIG=%q WORKDIR=%q MAPPA_REPO=%q ' "$CONFIG" "$WORKDIR" "$MAPPA_REPO"
  printf '%q ' "${command[@]}" | sed 's/ $//'
  echo
else
  "${command[@]}"
fi
