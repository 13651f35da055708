#!/usr/bin/env bash
# Stops the run on the workers (SIGTERM to its process group, then SIGKILL after 30 s).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/stop.sh [--worker N|all] [options] [--dry-run]

Stops the run started by launch/run.sh on the given workers [all]. The TPU keeps running (and
costing); launch/delete.sh removes it.

EOF
  common_help
}

parse_args "$@"
do_stop "${WORKER:-all}"
