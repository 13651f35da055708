#!/usr/bin/env bash
# Deletes the TPU (and its queued resource), after asking, unless --yes.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/delete.sh [--yes] [options] [--dry-run]

Deletes TPU VM NAME (with --queued: queued resource NAME-qr and its node). Everything on the VMs'
disks is lost: copy local results first (launch/copy_results.sh). Asks for confirmation unless
--yes (-y).

EOF
  common_help
}

parse_args "$@"
if is_true "${TPU_QUEUED}"; then
  what="queued resource ${TPU_QUEUED_ID} and its TPU ${TPU_NAME}"
else
  what="TPU ${TPU_NAME}"
fi
if ! is_true "${DRY_RUN}" && ! is_true "${ASSUME_YES}"; then
  answer=""
  printf 'Delete %s in %s? Its disks are lost. [y/N] ' "${what}" "${TPU_ZONE}" >&2
  read -r answer || true
  if [[ ! "${answer}" =~ ^[Yy]([Ee][Ss])?$ ]]; then
    echo "not deleted (pass --yes to skip this question)" >&2
    exit 1
  fi
fi
do_delete
