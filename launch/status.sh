#!/usr/bin/env bash
# Prints the TPU's state and, when it is READY, the run's state on every worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/status.sh [options] [--dry-run]

Prints 'state: STATE' (READY, CREATING, PREEMPTED, NOT_FOUND, or with --queued the queued
resource's state while it is not ACTIVE, e.g. WAITING_FOR_RESOURCES) and, when READY, one line per
worker: LAUNCH_STATUS=new (not set up), idle (set up, never run), running, lost (process gone
without an exit status, e.g. after a reboot) or exit:CODE (finished with that status).

EOF
  common_help
}

parse_args "$@"
state="$(tpu_state)"
echo "state: ${state}"
if [[ "${state}" == READY || "${state}" == DRY_RUN ]]; then
  gcloud_query compute tpus tpu-vm ssh "${TPU_NAME}" "--zone=${TPU_ZONE}" --worker=all \
    --strict-host-key-checking=no "--command=$(remote_status_command)" | grep LAUNCH_STATUS= || true
fi
