#!/usr/bin/env bash
# Train mappa_jax on a Cloud TPU VM slice (single host or pod). Every worker runs the same
# program (multi-controller JAX); jax.distributed finds the other workers on its own
# (--config.distributed.mode=tpu). Checkpoints and metrics go to a gs:// workdir through orbax,
# because the workers' local disks are not shared.
#
# Usage: launch/tpu_pod.sh [--dry-run] COMMAND [ARGS...]
#   create              create the TPU VM slice
#   install             clone the repo at REPO_REF on every worker and pip install it with jax[tpu]
#   push-env FILE       copy FILE (KEY=VALUE lines, e.g. GEMINI_API_KEY) to ~/.mappa_env (mode 600)
#                       on every worker; `run` sources it, so keys never appear on a command line
#   run [OVERRIDES...]  start `mappa-train` on all workers in the background, logging to LOG_FILE;
#                       OVERRIDES are extra --config.key=value flags
#   tail [WORKER]       follow the training log of one worker (default 0)
#   stop                stop the training process on every worker
#   delete              delete the slice
#
# Settings (environment variables, defaults in brackets):
#   TPU_NAME [mappa-pod]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-32]
#   RUNTIME_VERSION [tpu-ubuntu2204-base]  PROJECT [gcloud's default]  SPOT [0]: 1 = spot VMs
#   REPO_URL [https://github.com/YOUR_ORG/mappa_jax.git]  REPO_REF [main]
#   REMOTE_DIR [mappa_jax]  CONFIG [configs/demo.py]  WORKDIR (gs://..., required by run)
#   LOG_FILE [mappa_train.log]  DRY_RUN [0]: 1 = print the commands instead of running them
set -euo pipefail

TPU_NAME=${TPU_NAME:-mappa-pod}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
REPO_URL=${REPO_URL:-https://github.com/YOUR_ORG/mappa_jax.git}
REPO_REF=${REPO_REF:-main}
REMOTE_DIR=${REMOTE_DIR:-mappa_jax}
CONFIG=${CONFIG:-configs/demo.py}
WORKDIR=${WORKDIR:-}
LOG_FILE=${LOG_FILE:-mappa_train.log}
DRY_RUN=${DRY_RUN:-0}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

# Run a command, or print it (shell-quoted, one line) when DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

project_flag() {
  if [[ -n "$PROJECT" ]]; then
    printf -- '--project=%s\n' "$PROJECT"
  fi
}

# ssh into workers ($1: all or a worker index) and run the remote shell command $2.
ssh_workers() {
  local -a flags
  mapfile -t flags < <(project_flag)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${flags[@]}" --worker="$1" --command="$2"
}

cmd_create() {
  local -a flags
  mapfile -t flags < <(project_flag)
  if [[ "$SPOT" == 1 ]]; then
    flags+=(--spot)
  fi
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${flags[@]}"
}

cmd_install() {
  local dir ref url
  dir=$(printf '%q' "$REMOTE_DIR")
  ref=$(printf '%q' "$REPO_REF")
  url=$(printf '%q' "$REPO_URL")
  ssh_workers all "set -e; if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else git clone --quiet $url $dir; fi; \
git -C $dir checkout --quiet $ref; python3 -m pip install --quiet --upgrade pip; \
python3 -m pip install --quiet -e $dir 'jax[tpu]'; sudo apt-get install -y -qq bubblewrap >/dev/null || true"
}

cmd_push_env() {
  local file=${1:-}
  [[ -n "$file" ]] || die "push-env needs a FILE of KEY=VALUE lines"
  [[ -f "$file" || "$DRY_RUN" == 1 ]] || die "push-env: $file does not exist"
  local -a flags
  mapfile -t flags < <(project_flag)
  run gcloud compute tpus tpu-vm scp "$file" "$TPU_NAME:.mappa_env" --zone="$ZONE" "${flags[@]}" --worker=all
  ssh_workers all "chmod 600 ~/.mappa_env"
}

cmd_run() {
  [[ -n "$WORKDIR" ]] || die "run needs WORKDIR=gs://BUCKET/PATH (checkpoints and metrics shared by all workers)"
  [[ "$WORKDIR" == gs://* ]] || die "WORKDIR=$WORKDIR must be a gs:// path: the workers' local disks are not shared"
  local train
  train="mappa-train --config $(printf '%q' "$CONFIG") --config.workdir=$(printf '%q' "$WORKDIR") --config.distributed.mode=tpu"
  local override
  for override in "$@"; do
    train+=" $(printf '%q' "$override")"
  done
  local log
  log=$(printf '%q' "$LOG_FILE")
  # nohup + all three streams redirected: ssh returns while training goes on.
  # pip installs console scripts into ~/.local/bin for a non-root user: put it on PATH.
  ssh_workers all "set -e; export PATH=\"\$HOME/.local/bin:\$PATH\"; cd $(printf '%q' "$REMOTE_DIR"); if [ -f ~/.mappa_env ]; then set -a; . ~/.mappa_env; set +a; fi; \
nohup $train > ~/$log 2>&1 < /dev/null & echo \$! > ~/mappa_train.pid"
}

cmd_tail() {
  local worker=${1:-0}
  [[ "$worker" =~ ^[0-9]+$ ]] || die "tail: worker must be a number, got '$worker'"
  ssh_workers "$worker" "tail -n 200 -F ~/$(printf '%q' "$LOG_FILE")"
}

cmd_stop() {
  ssh_workers all "if [ -f ~/mappa_train.pid ]; then kill \$(cat ~/mappa_train.pid) 2>/dev/null || true; rm -f ~/mappa_train.pid; fi"
}

cmd_delete() {
  local -a flags
  mapfile -t flags < <(project_flag)
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${flags[@]}" --quiet
}

main() {
  if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
  fi
  local command=${1:-}
  [[ $# -gt 0 ]] && shift
  case "$command" in
    create) cmd_create ;;
    install) cmd_install ;;
    push-env) cmd_push_env "$@" ;;
    run) cmd_run "$@" ;;
    tail) cmd_tail "$@" ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      die "unknown command '${command}'"
      ;;
  esac
}

main "$@"
