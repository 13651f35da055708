#!/usr/bin/env bash
# Creates the TPU VM or pod slice (directly, or through a queued resource).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/create.sh [options] [--dry-run]

Creates TPU VM NAME with 'gcloud compute tpus tpu-vm create', or, with --queued, requests it with
'gcloud compute tpus queued-resources create' and waits until it is READY (--no-wait to return at
once; the wait polls every POLL_SECONDS [${POLL_SECONDS}] seconds).
Extra create flags (e.g. --reserved, --network=NET) go in TPU_CREATE_FLAGS.

EOF
  common_help
}

parse_args "$@"
do_create
if is_true "${TPU_QUEUED}" && is_true "${CREATE_WAIT}"; then
  wait_ready
fi
