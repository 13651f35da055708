#!/usr/bin/env bash
# Copies a run's results and log from a worker to this machine.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/copy_results.sh --workdir DIR [--dest LOCAL_DIR] [--worker N] [options] [--dry-run]

A gs:// workdir is already safe in Cloud Storage: nothing to copy (browse it with
'gcloud storage ls WORKDIR'). A local workdir (relative to the worker's home, or absolute)
is copied with scp from worker N [0] into LOCAL_DIR [results/NAME]. The worker's run log is
copied too, as LOCAL_DIR/run-workerN.log.

  --workdir DIR         RUN_WORKDIR     the workdir given to launch/run.sh [${RUN_WORKDIR}]
  --dest LOCAL_DIR      COPY_DEST       where to put the copies [results/NAME]

EOF
  common_help
}

parse_args "$@"
[[ -n "${RUN_WORKDIR}" ]] || die "no workdir: pass --workdir (the one given to launch/run.sh)"
worker="${WORKER:-0}"
[[ "${worker}" =~ ^[0-9]+$ ]] || die "--worker must be one worker number"
dest="${COPY_DEST:-results/${TPU_NAME}}"
if ! is_true "${DRY_RUN}"; then
  mkdir -p "${dest}"
fi
scp_from() {
  gcloud_run compute tpus tpu-vm scp --recurse "${TPU_NAME}:$1" "$2" "--zone=${TPU_ZONE}" \
    "--worker=${worker}" --strict-host-key-checking=no
}
if [[ "${RUN_WORKDIR}" == gs://* ]]; then
  echo "${RUN_WORKDIR} is in Cloud Storage: nothing to copy (see: gcloud storage ls ${RUN_WORKDIR})"
else
  # scp reads a relative remote path from the home directory, where run.sh puts it too.
  scp_from "${RUN_WORKDIR}" "${dest}/"
fi
scp_from "diffusion_jax_run/run.log" "${dest}/run-worker${worker}.log"
