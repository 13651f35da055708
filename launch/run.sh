#!/usr/bin/env bash
# Starts the same command on every worker, in the background, one log file per worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/run.sh --workdir gs://BUCKET/runs/NAME [options] [--dry-run] [-- MORE_FLAGS...]

Runs, on every worker at once (--worker=all), from ~/REMOTE_DIR with the virtualenv's python:
  python -m diffusion_jax.main --config CONFIG --workdir WORKDIR [--mode MODE] [MORE_FLAGS...]
under nohup, so it survives the ssh session. Each worker writes ~/diffusion_jax_run/run.log
(output), run.pid and, when the command ends, run.exit (its exit status). A run resumes from the
workdir's latest checkpoint. Refuses to start where a run is already in progress.

  --workdir DIR         RUN_WORKDIR     checkpoints and samples: gs://... (needed on pods and
                                        with supervise), or a path on the VM; a relative
                                        one is taken from the home directory [${RUN_WORKDIR}]
  --config FILE[:ARG]   RUN_CONFIG      [${RUN_CONFIG}]
  --mode MODE           RUN_MODE        train, eval, sample, summary [${RUN_MODE}]
  --command 'CMD'       RUN_COMMAND     run this command line instead
  -- MORE_FLAGS         passed on to diffusion_jax.main (e.g. -- --config.optim.lr=1e-4)

EOF
  common_help
}

parse_args "$@"
do_run
