#!/usr/bin/env bash
# Shows (and follows) the run's log of one worker or of all of them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/logs.sh [--worker N|all] [--lines N] [--no-follow] [options] [--dry-run]

Prints the last N lines [${LOG_LINES}] of ~/diffusion_jax_run/run.log on worker N [0], or on all
workers with each line prefixed by the worker's host name, and keeps following it until Ctrl-C
(unless --no-follow). Stopping this does not stop the run.

EOF
  common_help
}

parse_args "$@"
[[ "${LOG_LINES}" =~ ^[0-9]+$ ]] || die "--lines needs a whole number"
worker="${WORKER:-0}"
[[ "${worker}" =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker number or 'all'"
follow=""
if is_true "${LOG_FOLLOW}"; then
  follow=" -F"
fi
tpu_ssh "${worker}" "$(remote_paths); H=\"\$(hostname)\"; tail -n ${LOG_LINES}${follow} \"\$L/run.log\" | sed -u \"s/^/[\$H] /\""
