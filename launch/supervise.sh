#!/usr/bin/env bash
# Keeps a run going on Spot or queued TPUs: recreates the slice after a preemption, sets it up
# again and relaunches the command, which resumes from the workdir's latest checkpoint.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/supervise.sh --workdir gs://BUCKET/runs/NAME [options] [--dry-run] [-- MORE_FLAGS...]

Every SUPERVISE_POLL_SECONDS it reads the TPU's state ('tpu-vm describe', or with --queued the
queued resource's), then:
  NOT_FOUND               creates it (then sets it up and starts the run)
  PREEMPTED, TERMINATED,  deletes and recreates it (a restart), then sets it up and starts the
  STOPPED, SUSPENDED, ... same command again, which resumes from the latest checkpoint
  READY                   asks every worker for its run state (launch/status.sh):
                            all exit:0  -> the run is finished: exits 0
                            exit:N / lost on any worker -> stops it everywhere and restarts it
                            new / idle  -> sets up (if needed) and starts the run
  other (CREATING, WAITING_FOR_RESOURCES, ...) waits.
Recreations, relaunches and failed steps count as restarts; after SUPERVISE_MAX_RESTARTS it
gives up (exit 1). The workdir must be in Cloud Storage (gs://), since a preempted VM loses its disk.
Leave it running in tmux/screen or 'nohup ... &' on a machine that stays up (e.g. a small VM).

  --workdir gs://...    RUN_WORKDIR                checkpoints; required [${RUN_WORKDIR}]
  --config FILE[:ARG]   RUN_CONFIG                 [${RUN_CONFIG}]
  --mode MODE           RUN_MODE                   [${RUN_MODE}]
  --command 'CMD'       RUN_COMMAND                run this command line instead
  --data-dir gs://...   DATA_GCS_DIR               with --dataset: after setting up a new slice,
  --dataset NAME        DATA_DATASET               copy the dataset prepared there onto every
                                                   worker (launch/prepare_data.sh --steps workers)
  --max-restarts N      SUPERVISE_MAX_RESTARTS     [${SUPERVISE_MAX_RESTARTS}]
  --poll-seconds S      SUPERVISE_POLL_SECONDS     [${SUPERVISE_POLL_SECONDS}]
  -- MORE_FLAGS         passed on to diffusion_jax.main
Setup options (--repo-url, --repo-ref, --repo-dir, --python, ...) as for launch/setup.sh.

EOF
  common_help
}

parse_args "$@"
[[ -n "${RUN_WORKDIR}" ]] \
  || die "supervise needs --workdir gs://BUCKET/... (or RUN_WORKDIR): the relaunched run resumes from its checkpoints"
[[ "${RUN_WORKDIR}" == gs://?* ]] \
  || die "supervise needs a gs:// workdir, got '${RUN_WORKDIR}': a preempted TPU VM loses its disk and the checkpoints with it"
POLL_SECONDS="${SUPERVISE_POLL_SECONDS}"

# The steps run as separate scripts so that `set -e` holds inside them and a failure is seen here.
export TPU_NAME TPU_ZONE TPU_PROJECT TPU_TYPE TPU_RUNTIME TPU_SPOT TPU_QUEUED TPU_QUEUED_ID \
  TPU_CREATE_FLAGS REPO_URL REPO_REF REPO_DIR REMOTE_DIR REMOTE_VENV PYTHON_VERSION PYTHON_INSTALLER \
  RUN_CONFIG RUN_WORKDIR RUN_MODE RUN_COMMAND POLL_SECONDS DRY_RUN DATA_GCS_DIR DATA_DATASET
step() {
  local script="$1"
  shift
  "${LAUNCH_DIR}/${script}" "$@"
}
# A new slice's disks are empty: set up the code, then copy the prepared dataset if one is named.
setup_step() {
  step setup.sh || return 1
  if [[ -n "${DATA_GCS_DIR}" ]]; then
    step prepare_data.sh --steps workers
  fi
}
run_step() {
  if ((${#EXTRA_ARGS[@]})); then
    step run.sh -- "${EXTRA_ARGS[@]}"
  else
    step run.sh
  fi
}

# Summarises the workers' LAUNCH_STATUS lines as done|failed|running|new|idle|unknown.
run_status() {
  local out
  out="$(gcloud_query compute tpus tpu-vm ssh "${TPU_NAME}" "--zone=${TPU_ZONE}" --worker=all \
    --strict-host-key-checking=no "--command=$(remote_status_command)")" || true
  local statuses
  statuses="$(printf '%s\n' "${out}" | sed -n 's/.*LAUNCH_STATUS=\([a-z]*:\{0,1\}-\{0,1\}[0-9]*\).*/\1/p')"
  if [[ -z "${statuses}" ]]; then
    echo unknown
  elif ! grep -qv '^exit:0$' <<<"${statuses}"; then
    echo "done"
  elif grep -qE '^(lost|exit:-?[1-9][0-9]*)$' <<<"${statuses}"; then
    echo failed
  elif grep -qx running <<<"${statuses}"; then
    echo running
  elif grep -qx new <<<"${statuses}"; then
    echo new
  else
    echo idle
  fi
}

restarts=0
count_restart() {
  if ((restarts >= SUPERVISE_MAX_RESTARTS)); then
    log "giving up: $1, and ${restarts} restarts (SUPERVISE_MAX_RESTARTS) are used up"
    exit 1
  fi
  restarts=$((restarts + 1))
  log "restart ${restarts}/${SUPERVISE_MAX_RESTARTS}: $1"
}

if is_true "${DRY_RUN}"; then
  echo "# each poll:"
  tpu_state >/dev/null
  run_status >/dev/null
  echo "# after a preemption:"
  step delete.sh --yes
  step create.sh --no-wait
  setup_step
  run_step
  exit 0
fi

seen=0
while true; do
  state="$(tpu_state)"
  acted=0
  case "${state}" in
    READY)
      seen=1
      status="$(run_status)"
      case "${status}" in
        done)
          log "the run finished with status 0 on every worker; ${restarts} restarts"
          exit 0 ;;
        running) ;;
        new|idle)
          log "starting the run (workers: ${status})"
          if [[ "${status}" == new ]] && ! setup_step; then
            count_restart "setup failed"
          elif ! run_step; then
            count_restart "starting the run failed"
          fi ;;
        failed)
          count_restart "the run ended with an error or vanished on some worker"
          step stop.sh || true
          run_step || log "starting the run failed; trying again at the next poll" ;;
        unknown) log "could not read the run's state from the workers; trying again" ;;
      esac ;;
    NOT_FOUND)
      if ((seen)); then
        count_restart "${TPU_NAME} is gone"
      fi
      seen=1
      log "creating ${TPU_NAME}"
      step create.sh --no-wait || log "create failed; trying again at the next poll"
      acted=1 ;;
    PREEMPTED|TERMINATED|STOPPED|STOPPING|SUSPENDED|SUSPENDING|FAILED)
      seen=1
      count_restart "${TPU_NAME} is ${state}"
      step delete.sh --yes || log "delete failed; trying again at the next poll"
      step create.sh --no-wait || log "create failed; trying again at the next poll"
      acted=1 ;;
    *) log "${TPU_NAME}: ${state}; waiting" ;;
  esac
  if ((!acted)); then
    sleep "${SUPERVISE_POLL_SECONDS}"
  fi
done
