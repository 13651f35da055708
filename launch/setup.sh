#!/usr/bin/env bash
# Puts the code on every worker and installs Python >= 3.11, a virtualenv, the package and
# jax[tpu]. Starts nothing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/setup.sh [options] [--dry-run]

On every worker (--worker=all): copies the code to ~/REMOTE_DIR, installs Python PYTHON_VERSION
when the image's python is older, creates the virtualenv ~/REMOTE_VENV and runs
'pip install -e REMOTE_DIR[tpu]'. Refuses to run on a worker where a run is in progress.

Code source:
  --repo-dir DIR        REPO_DIR        local checkout copied with scp (tracked and untracked,
                                        not ignored, files) [${REPO_DIR}]
  --repo-url URL        REPO_URL        git clone this URL on each worker instead
  --repo-ref REF        REPO_REF        branch, tag or commit to check out [${REPO_REF}]
Installation:
  --remote-dir DIR      REMOTE_DIR      code directory, relative to home [${REMOTE_DIR}]
                        REMOTE_VENV     virtualenv, relative to home [${REMOTE_VENV}]
  --python X.Y          PYTHON_VERSION  minimum Python version [${PYTHON_VERSION}]
  --python-installer deadsnakes|uv
                        PYTHON_INSTALLER how to install it when missing [${PYTHON_INSTALLER}]

EOF
  common_help
}

parse_args "$@"
do_setup
