# shellcheck shell=bash disable=SC2034  # settings read by the scripts that source this file
# Shared settings, argument parsing and gcloud wrappers for the launch/*.sh scripts.
# Sourced, never run. Every setting is an environment variable that a flag can override;
# `launch/<script>.sh --help` lists them.

set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# --- Settings (environment variables with defaults) -------------------------------------------
TPU_NAME="${TPU_NAME:-diffusion-jax}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_TYPE="${TPU_TYPE:-v4-8}"
TPU_RUNTIME="${TPU_RUNTIME:-}"
TPU_SPOT="${TPU_SPOT:-0}"
TPU_QUEUED="${TPU_QUEUED:-0}"
TPU_QUEUED_ID="${TPU_QUEUED_ID:-}"
TPU_CREATE_FLAGS="${TPU_CREATE_FLAGS:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
REPO_DIR="${REPO_DIR:-$(cd "${LAUNCH_DIR}/.." && pwd)}"
REMOTE_DIR="${REMOTE_DIR:-diffusion_jax}"
REMOTE_VENV="${REMOTE_VENV:-.venvs/diffusion_jax}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
PYTHON_INSTALLER="${PYTHON_INSTALLER:-deadsnakes}"
RUN_CONFIG="${RUN_CONFIG:-configs/cifar10.py}"
RUN_WORKDIR="${RUN_WORKDIR:-}"
RUN_MODE="${RUN_MODE:-train}"
RUN_COMMAND="${RUN_COMMAND:-}"
POLL_SECONDS="${POLL_SECONDS:-60}"
SUPERVISE_MAX_RESTARTS="${SUPERVISE_MAX_RESTARTS:-10}"
SUPERVISE_POLL_SECONDS="${SUPERVISE_POLL_SECONDS:-300}"
DRY_RUN="${DRY_RUN:-0}"
ASSUME_YES=0
CREATE_WAIT="${CREATE_WAIT:-1}"
LOG_FOLLOW=1
LOG_LINES=100
COPY_DEST="${COPY_DEST:-}"
DATA_DATASET="${DATA_DATASET:-cifar10}"
DATA_GCS_DIR="${DATA_GCS_DIR:-}"
DATA_BUILD_DIR="${DATA_BUILD_DIR:-${HOME}/tensorflow_datasets}"
DATA_STEPS="${DATA_STEPS:-build,upload,workers}"
WORKER=""
EXTRA_ARGS=()

# Where each worker keeps its run state: run.log, run.pid, run.exit (exit status), setup.ok.
# Outside REMOTE_DIR so that re-copying the code keeps the logs.
# shellcheck disable=SC2016  # expanded on the worker, not here
REMOTE_STATE='$HOME/diffusion_jax_run'

DRY_RUN_PREFIX="dry-run:"
# --dry-run lines go to the script's own stdout even from inside $(...).
exec 3>&1

die() {
  echo "error: $*" >&2
  exit 2
}

log() {
  echo "[launch] $*" >&2
}

# Quotes one word so that a POSIX shell (and Python's shlex) reads it back unchanged.
shquote() {
  local word="$1"
  if [[ -n "${word}" && "${word}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "${word}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces.
shjoin() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shquote "${word}")"
  done
  printf '%s' "${out}"
}

# --- Argument parsing ---------------------------------------------------------------------------
# Flags shared by all scripts; a script reads only those it needs (see its --help).
# Anything after `--` is kept in EXTRA_ARGS (run.sh passes it on to diffusion_jax.main).
parse_args() {
  while (($#)); do
    local flag="$1" value=""
    if [[ "${flag}" == --*=* ]]; then
      value="${flag#*=}"
      flag="${flag%%=*}"
      set -- "${flag}" "${value}" "${@:2}"
    fi
    case "${flag}" in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --yes|-y) ASSUME_YES=1; shift; continue ;;
      --no-wait) CREATE_WAIT=0; shift; continue ;;
      --no-follow) LOG_FOLLOW=0; shift; continue ;;
      --spot) TPU_SPOT=1; shift; continue ;;
      --no-spot) TPU_SPOT=0; shift; continue ;;
      --queued) TPU_QUEUED=1; shift; continue ;;
      --no-queued) TPU_QUEUED=0; shift; continue ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
    esac
    case "${flag}" in
      --name|--zone|--project|--type|--accelerator-type|--runtime|--version|--queued-id) ;;
      --repo-url|--repo-ref|--repo-dir|--remote-dir|--python|--python-installer) ;;
      --config|--workdir|--mode|--command|--worker|--dest|--lines) ;;
      --max-restarts|--poll-seconds) ;;
      --dataset|--data-dir|--build-dir|--steps) ;;
      *) die "unknown argument '${flag}' (see --help)" ;;
    esac
    (($# >= 2)) || die "${flag} needs a value (see --help)"
    value="$2"
    case "${flag}" in
      --name) TPU_NAME="${value}" ;;
      --zone) TPU_ZONE="${value}" ;;
      --project) TPU_PROJECT="${value}" ;;
      --type|--accelerator-type) TPU_TYPE="${value}" ;;
      --runtime|--version) TPU_RUNTIME="${value}" ;;
      --queued-id) TPU_QUEUED_ID="${value}" ;;
      --repo-url) REPO_URL="${value}" ;;
      --repo-ref) REPO_REF="${value}" ;;
      --repo-dir) REPO_DIR="${value}" ;;
      --remote-dir) REMOTE_DIR="${value}" ;;
      --python) PYTHON_VERSION="${value}" ;;
      --python-installer) PYTHON_INSTALLER="${value}" ;;
      --config) RUN_CONFIG="${value}" ;;
      --workdir) RUN_WORKDIR="${value}" ;;
      --mode) RUN_MODE="${value}" ;;
      --command) RUN_COMMAND="${value}" ;;
      --worker) WORKER="${value}" ;;
      --dest) COPY_DEST="${value}" ;;
      --lines) LOG_LINES="${value}" ;;
      --max-restarts) SUPERVISE_MAX_RESTARTS="${value}" ;;
      --poll-seconds) SUPERVISE_POLL_SECONDS="${value}"; POLL_SECONDS="${value}" ;;
      --dataset) DATA_DATASET="${value}" ;;
      --data-dir) DATA_GCS_DIR="${value}" ;;
      --build-dir) DATA_BUILD_DIR="${value}" ;;
      --steps) DATA_STEPS="${value}" ;;
    esac
    shift 2
  done
  finish_settings
}

is_true() {
  [[ "$1" == 1 || "$1" == true || "$1" == yes ]]
}

# Runtime image per TPU generation; the accelerator type starts with the generation.
default_runtime() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

finish_settings() {
  [[ "${TPU_NAME}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "TPU name '${TPU_NAME}' must be lowercase letters, digits and hyphens, starting with a letter"
  [[ -n "${TPU_ZONE}" ]] || die "no zone: set TPU_ZONE or pass --zone (e.g. us-central2-b)"
  [[ "${TPU_TYPE}" =~ ^[a-z0-9]+-[0-9]+$ ]] \
    || die "accelerator type '${TPU_TYPE}' does not look like GENERATION-CORES (e.g. v4-8, v5litepod-8, v6e-8, v4-32)"
  if [[ -z "${TPU_RUNTIME}" ]]; then
    TPU_RUNTIME="$(default_runtime "${TPU_TYPE}")" \
      || die "unknown TPU generation in accelerator type '${TPU_TYPE}' (known: v4, v5litepod, v5p, v6e);" \
             "pass --runtime (or set TPU_RUNTIME) with a runtime version from" \
             "'gcloud compute tpus tpu-vm versions list --zone=${TPU_ZONE}'"
  fi
  TPU_QUEUED_ID="${TPU_QUEUED_ID:-${TPU_NAME}-qr}"
  [[ "${PYTHON_VERSION}" =~ ^3\.[0-9]+$ ]] || die "PYTHON_VERSION must look like 3.11, got '${PYTHON_VERSION}'"
  case "${PYTHON_INSTALLER}" in
    deadsnakes|uv) ;;
    *) die "PYTHON_INSTALLER must be 'deadsnakes' or 'uv', got '${PYTHON_INSTALLER}'" ;;
  esac
  [[ "${SUPERVISE_MAX_RESTARTS}" =~ ^[0-9]+$ ]] || die "max restarts must be a whole number"
  [[ "${SUPERVISE_POLL_SECONDS}" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "poll seconds must be a number"
  [[ "${POLL_SECONDS}" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "POLL_SECONDS must be a number"
}

# Text shared by every --help.
common_help() {
  cat <<EOF
Common options (flag / environment variable, default):
  --name NAME           TPU_NAME        TPU VM (node) name          [${TPU_NAME}]
  --zone ZONE           TPU_ZONE        zone that offers the type   [${TPU_ZONE}]
  --project PROJECT     TPU_PROJECT     project; empty = gcloud's configured one [${TPU_PROJECT:-}]
  --type TYPE           TPU_TYPE        accelerator type, e.g. v4-8, v4-32, v5litepod-8, v6e-8, v5p-8 [${TPU_TYPE}]
  --runtime VERSION     TPU_RUNTIME     runtime image; default by generation:
                                        v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                                        v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot | --no-spot    TPU_SPOT=1|0    Spot (preemptible, cheaper) capacity [${TPU_SPOT}]
  --queued | --no-queued TPU_QUEUED=1|0 request through a queued resource [${TPU_QUEUED}]
  --queued-id ID        TPU_QUEUED_ID   queued resource name        [NAME-qr]
  --dry-run             DRY_RUN=1       print the gcloud commands (prefixed '${DRY_RUN_PREFIX}') and touch nothing
  -h, --help            this text
EOF
}

# --- gcloud wrappers ------------------------------------------------------------------------------
project_flags() {
  if [[ -n "${TPU_PROJECT}" ]]; then
    printf '%s\n' "--project=${TPU_PROJECT}"
  fi
}

# Runs `gcloud ARGS...` (adding --project when set), or only prints it under --dry-run.
gcloud_run() {
  local args=("$@")
  local extra
  while IFS= read -r extra; do args+=("${extra}"); done < <(project_flags)
  if is_true "${DRY_RUN}"; then
    echo "${DRY_RUN_PREFIX} $(shjoin gcloud "${args[@]}")" >&3
    return 0
  fi
  log "$(shjoin gcloud "${args[@]}")"
  gcloud "${args[@]}"
}

# Like gcloud_run but captures stdout and stderr; never printed under --dry-run and never fails
# the script: prints the output and returns gcloud's status.
gcloud_query() {
  local args=("$@")
  local extra
  while IFS= read -r extra; do args+=("${extra}"); done < <(project_flags)
  if is_true "${DRY_RUN}"; then
    echo "${DRY_RUN_PREFIX} $(shjoin gcloud "${args[@]}")" >&3
    return 0
  fi
  local status=0
  gcloud "${args[@]}" 2>&1 || status=$?
  return "${status}"
}

tpu_ssh() {
  local worker="$1" command="$2"
  gcloud_run compute tpus tpu-vm ssh "${TPU_NAME}" "--zone=${TPU_ZONE}" "--worker=${worker}" \
    --strict-host-key-checking=no "--command=${command}"
}

# --- Remote command text (one line each, so that --dry-run output stays one command a line) -------
remote_paths() {
  printf '%s' "D=\"\$HOME\"/$(shquote "${REMOTE_DIR}"); V=\"\$HOME\"/$(shquote "${REMOTE_VENV}"); L=\"${REMOTE_STATE}\"; export D V L; " \
    "alive() { [ -f \"\$L/run.pid\" ] && kill -0 \"\$(cat \"\$L/run.pid\")\" 2>/dev/null && ! ps -o stat= -p \"\$(cat \"\$L/run.pid\")\" | grep -q Z; }"
}

# The python command line the run executes on every worker.
training_command() {
  if [[ -n "${RUN_COMMAND}" ]]; then
    printf '%s' "${RUN_COMMAND}"
    return
  fi
  local cmd=(python -m diffusion_jax.main --config "${RUN_CONFIG}" --workdir)
  local workdir
  if [[ "${RUN_WORKDIR}" == *://* || "${RUN_WORKDIR}" == /* ]]; then
    workdir="$(shquote "${RUN_WORKDIR}")"
  else
    # A local relative workdir lives in the worker's home, so that setup.sh, which replaces the
    # code directory, never deletes results.
    workdir="\"\$HOME\"/$(shquote "${RUN_WORKDIR}")"
  fi
  local tail=()
  if [[ "${RUN_MODE}" != train ]]; then
    tail+=(--mode "${RUN_MODE}")
  fi
  if ((${#EXTRA_ARGS[@]})); then
    tail+=("${EXTRA_ARGS[@]}")
  fi
  printf '%s %s' "$(shjoin "${cmd[@]}")" "${workdir}"
  if ((${#tail[@]})); then
    printf ' %s' "$(shjoin "${tail[@]}")"
  fi
}

remote_setup_command() {
  local code_step
  if [[ -n "${REPO_URL}" ]]; then
    code_step="rm -rf \"\$D\"; git clone -q $(shquote "${REPO_URL}") \"\$D\"; git -C \"\$D\" checkout -q $(shquote "${REPO_REF}")"
  else
    code_step="rm -rf \"\$D\"; mv \"\$D.incoming\" \"\$D\""
  fi
  local apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q'
  local install_python
  if [[ "${PYTHON_INSTALLER}" == uv ]]; then
    install_python="curl -LsSf https://astral.sh/uv/install.sh | sh; \"\$HOME/.local/bin/uv\" python install ${PYTHON_VERSION}; PY=\"\$(\"\$HOME/.local/bin/uv\" python find ${PYTHON_VERSION})\""
  else
    install_python="${apt} update; ${apt} install software-properties-common; sudo add-apt-repository -y ppa:deadsnakes/ppa; ${apt} update; ${apt} install python${PYTHON_VERSION} python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev; PY=/usr/bin/python${PYTHON_VERSION}"
  fi
  local minor="${PYTHON_VERSION#3.}"
  printf '%s' "set -euo pipefail; $(remote_paths); mkdir -p \"\$L\"; " \
    "if alive; then echo \"a run is in progress on \$(hostname); stop it first (launch/stop.sh)\" >&2; exit 3; fi; " \
    "rm -f \"\$L/setup.ok\"; ${code_step}; " \
    "PY=; for c in python3.13 python3.12 python3.11 python3; do if command -v \"\$c\" >/dev/null && \"\$c\" -c 'import sys; sys.exit(sys.version_info < (3, ${minor}))'; then PY=\"\$(command -v \"\$c\")\"; break; fi; done; " \
    "if [ -z \"\$PY\" ]; then echo \"installing Python ${PYTHON_VERSION} (${PYTHON_INSTALLER})\"; ${install_python}; fi; " \
    "\"\$PY\" -m venv --clear \"\$V\"; \"\$V/bin/python\" -m pip install -q -U pip setuptools wheel; " \
    "\"\$V/bin/python\" -m pip install -q -e \"\$D[tpu]\"; " \
    "\"\$V/bin/python\" -c 'import sys, jax, diffusion_jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)'; " \
    "touch \"\$L/setup.ok\"; echo \"setup done on \$(hostname)\""
}

remote_run_command() {
  local train inner
  train="$(training_command)"
  inner="(cd \"\$D\" && export PATH=\"\$V/bin:\$PATH\" && ${train}); echo \$? > \"\$L/run.exit\""
  printf '%s' "set -euo pipefail; $(remote_paths); " \
    "if [ ! -f \"\$L/setup.ok\" ]; then echo \"\$(hostname) is not set up: run launch/setup.sh first\" >&2; exit 3; fi; " \
    "if alive; then echo \"a run is already in progress on \$(hostname); stop it first (launch/stop.sh)\" >&2; exit 4; fi; " \
    "rm -f \"\$L/run.exit\"; printf '%s\\n' $(shquote "${train}") > \"\$L/run.cmd\"; " \
    "nohup setsid bash -c $(shquote "${inner}") > \"\$L/run.log\" 2>&1 < /dev/null & " \
    "echo \$! > \"\$L/run.pid\"; echo \"started on \$(hostname), pid \$(cat \"\$L/run.pid\"), log \$L/run.log\""
}

remote_stop_command() {
  printf '%s' "$(remote_paths); " \
    "if alive; then kill -TERM -- \"-\$(cat \"\$L/run.pid\")\" || kill -TERM \"\$(cat \"\$L/run.pid\")\"; " \
    "for _ in \$(seq 30); do alive || break; sleep 1; done; " \
    "kill -KILL -- \"-\$(cat \"\$L/run.pid\")\" 2>/dev/null || true; echo \"stopped the run on \$(hostname)\"; " \
    "else echo \"no run in progress on \$(hostname)\"; fi"
}

# One line per worker: LAUNCH_STATUS=new|idle|running|lost|exit:CODE.
remote_status_command() {
  printf '%s' "$(remote_paths); " \
    "if [ -f \"\$L/run.exit\" ]; then echo \"LAUNCH_STATUS=exit:\$(cat \"\$L/run.exit\")\"; " \
    "elif alive; then echo LAUNCH_STATUS=running; " \
    "elif [ -f \"\$L/run.pid\" ]; then echo LAUNCH_STATUS=lost; " \
    "elif [ -f \"\$L/setup.ok\" ]; then echo LAUNCH_STATUS=idle; else echo LAUNCH_STATUS=new; fi"
}

# --- Steps (each script calls one; supervise.sh calls several) -----------------------------------
do_create() {
  local flags=("--zone=${TPU_ZONE}" "--accelerator-type=${TPU_TYPE}")
  local extra=()
  if [[ -n "${TPU_CREATE_FLAGS}" ]]; then
    read -r -a extra <<<"${TPU_CREATE_FLAGS}"
  fi
  if is_true "${TPU_QUEUED}"; then
    flags+=("--runtime-version=${TPU_RUNTIME}")
    if is_true "${TPU_SPOT}"; then flags+=(--spot); fi
    gcloud_run compute tpus queued-resources create "${TPU_QUEUED_ID}" "--node-id=${TPU_NAME}" \
      "${flags[@]}" ${extra[@]+"${extra[@]}"}
  else
    flags+=("--version=${TPU_RUNTIME}")
    if is_true "${TPU_SPOT}"; then flags+=(--spot); fi
    gcloud_run compute tpus tpu-vm create "${TPU_NAME}" "${flags[@]}" ${extra[@]+"${extra[@]}"}
  fi
}

# Prints one word: the node state (READY, CREATING, PREEMPTED, ...), the queued resource's state
# while it is not ACTIVE (WAITING_FOR_RESOURCES, SUSPENDED, ...), NOT_FOUND, or UNKNOWN when gcloud
# failed for another reason.
tpu_state() {
  local out status=0
  if is_true "${TPU_QUEUED}"; then
    out="$(gcloud_query compute tpus queued-resources describe "${TPU_QUEUED_ID}" "--zone=${TPU_ZONE}" \
      '--format=value(state.state)')" || status=$?
    if ((status)) || [[ "${out}" != *ACTIVE* ]]; then
      state_word "${status}" "${out}"
      return
    fi
  fi
  status=0
  out="$(gcloud_query compute tpus tpu-vm describe "${TPU_NAME}" "--zone=${TPU_ZONE}" \
    '--format=value(state)')" || status=$?
  state_word "${status}" "${out}"
}

state_word() {
  local status="$1" out="$2"
  if is_true "${DRY_RUN}"; then
    echo "DRY_RUN"
  elif ((status)); then
    if [[ "${out}" == *NOT_FOUND* || "${out}" == *"not found"* || "${out}" == *"was not found"* ]]; then
      echo NOT_FOUND
    else
      log "could not read the TPU state: ${out}"
      echo UNKNOWN
    fi
  else
    # The last non-empty word: gcloud may print warnings before the value.
    local word
    word="$(printf '%s\n' "${out}" | awk 'NF {w=$NF} END {print w}')"
    echo "${word:-UNKNOWN}"
  fi
}

# Waits until the slice is READY (needed after a queued resource request).
wait_ready() {
  if is_true "${DRY_RUN}"; then return 0; fi
  local state
  while true; do
    state="$(tpu_state)"
    case "${state}" in
      READY) log "${TPU_NAME} is READY"; return 0 ;;
      FAILED|SUSPENDED|PREEMPTED|TERMINATED) die "${TPU_NAME} is ${state}; delete it and create it again" ;;
    esac
    log "${TPU_NAME}: ${state}; checking again in ${POLL_SECONDS}s"
    sleep "${POLL_SECONDS}"
  done
}

# Stages the tracked and untracked-but-not-ignored files of REPO_DIR (no .git, venvs or caches).
stage_code() {
  local stage="$1"
  mkdir -p "${stage}"
  if git -C "${REPO_DIR}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "${REPO_DIR}" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' file; do [[ -e "${file}" ]] && printf '%s\0' "${file}"; done \
      | tar --null -T - -cf -) | tar -xf - -C "${stage}"
  else
    tar -C "${REPO_DIR}" --exclude=.git --exclude='.venv*' --exclude=.cache --exclude=__pycache__ \
      -cf - . | tar -xf - -C "${stage}"
  fi
}

do_setup() {
  if [[ -z "${REPO_URL}" ]]; then
    [[ -f "${REPO_DIR}/setup.cfg" || -f "${REPO_DIR}/pyproject.toml" ]] \
      || die "REPO_DIR '${REPO_DIR}' is not a diffusion_jax checkout (pass --repo-dir or --repo-url)"
    local incoming="${REMOTE_DIR}.incoming"
    tpu_ssh all "rm -rf \"\$HOME\"/$(shquote "${incoming}")"
    if is_true "${DRY_RUN}"; then
      gcloud_run compute tpus tpu-vm scp --recurse "${REPO_DIR}" "${TPU_NAME}:${incoming}" \
        "--zone=${TPU_ZONE}" --worker=all --strict-host-key-checking=no
    else
      local tmp
      tmp="$(mktemp -d)"
      # shellcheck disable=SC2064  # expand now: tmp is local
      trap "rm -rf '${tmp}'" EXIT
      stage_code "${tmp}/code"
      gcloud_run compute tpus tpu-vm scp --recurse "${tmp}/code" "${TPU_NAME}:${incoming}" \
        "--zone=${TPU_ZONE}" --worker=all --strict-host-key-checking=no
      rm -rf "${tmp}"
      trap - EXIT
    fi
  fi
  tpu_ssh all "$(remote_setup_command)"
}

require_command() {
  if [[ -z "${RUN_COMMAND}" && -z "${RUN_WORKDIR}" ]]; then
    die "no workdir: pass --workdir gs://BUCKET/runs/NAME (or set RUN_WORKDIR)"
  fi
}

# Hosts in a slice: one per 8 TensorCores (v4, v5p) or 8 chips (v5e, v6e) -- more than 8 means
# several hosts, which cannot share a local directory.
warn_local_workdir_on_pod() {
  local cores="${TPU_TYPE##*-}"
  if [[ -n "${RUN_WORKDIR}" && "${RUN_WORKDIR}" != gs://* ]] && ((cores > 8)); then
    log "warning: ${TPU_TYPE} has several hosts; a local workdir (${RUN_WORKDIR}) is not shared" \
      "between them, so checkpoints will be incomplete. Use a gs:// workdir."
  fi
}

do_run() {
  require_command
  warn_local_workdir_on_pod
  tpu_ssh all "$(remote_run_command)"
}

do_stop() {
  tpu_ssh "${1:-all}" "$(remote_stop_command)"
}

do_delete() {
  if is_true "${TPU_QUEUED}"; then
    gcloud_run compute tpus queued-resources delete "${TPU_QUEUED_ID}" "--zone=${TPU_ZONE}" --force --quiet
  else
    gcloud_run compute tpus tpu-vm delete "${TPU_NAME}" "--zone=${TPU_ZONE}" --quiet
  fi
}
