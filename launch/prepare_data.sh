#!/usr/bin/env bash
# Builds a tfds dataset once, keeps it in Cloud Storage, and copies it onto every worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/prepare_data.sh --data-dir gs://BUCKET/tfds [--dataset NAME] [options] [--dry-run]

Gets a tfds dataset onto every host of a pod, in three steps (--steps, default all three):
  build    on this machine (one VM with tensorflow and tensorflow-datasets installed, e.g.
           'pip install -e ".[tf]"'), once: tfds build NAME --file_format=array_record
           into BUILD_DIR
  upload   copies BUILD_DIR/NAME to DATA_DIR/NAME in Cloud Storage (gcloud storage rsync), where
           every later slice finds it
  workers  on every worker of the TPU (--name), copies DATA_DIR/NAME into ~/tensorflow_datasets,
           where training reads it with the config's default data.data_dir ('')
Training reads ArrayRecord files by index, from a local disk: their reader cannot open gs://
paths, so --config.data.data_dir=gs://... is refused. Rerun '--steps workers' on every new
slice (a recreated Spot slice starts with an empty disk).
Datasets that need a manual download (celeb_a_hq, lsun) need it in BUILD_DIR/downloads/manual
first (see 'tfds build NAME --help').

  --data-dir gs://...   DATA_GCS_DIR    Cloud Storage folder for prepared datasets; required
                                        [${DATA_GCS_DIR}]
  --dataset NAME        DATA_DATASET    tfds name, e.g. cifar10, lsun/bedroom, celeb_a_hq/256
                                        [${DATA_DATASET}]
  --build-dir DIR       DATA_BUILD_DIR  where 'build' writes on this machine [${DATA_BUILD_DIR}]
  --steps LIST          DATA_STEPS      comma-separated: build, upload, workers [${DATA_STEPS}]

EOF
  common_help
}

parse_args "$@"
[[ -n "${DATA_GCS_DIR}" ]] || die "prepare_data needs --data-dir gs://BUCKET/tfds (or DATA_GCS_DIR): the prepared dataset is kept there for every slice"
[[ "${DATA_GCS_DIR}" == gs://?* ]] || die "--data-dir must be a gs:// folder, got '${DATA_GCS_DIR}'"
[[ "${DATA_DATASET}" =~ ^[a-z][a-z0-9_]*(/[A-Za-z0-9_.]+)?(:[0-9.]+)?$ ]] \
  || die "--dataset '${DATA_DATASET}' is not a tfds name like cifar10 or lsun/bedroom"
IFS=',' read -r -a steps <<<"${DATA_STEPS}"
((${#steps[@]})) || die "--steps is empty: give build, upload and/or workers"
for s in "${steps[@]}"; do
  case "${s}" in
    build|upload|workers) ;;
    *) die "unknown step '${s}' in --steps (known: build, upload, workers)" ;;
  esac
done
wants() {
  local s
  for s in "${steps[@]}"; do [[ "${s}" == "$1" ]] && return 0; done
  return 1
}

# The top folder of a tfds name (lsun/bedroom -> lsun), which holds every config's files.
top="${DATA_DATASET%%/*}"
top="${top%%:*}"
source_dir="${DATA_GCS_DIR%/}/${top}"

# Prints a local command under --dry-run, runs it otherwise.
local_run() {
  if is_true "${DRY_RUN}"; then
    echo "${DRY_RUN_PREFIX} $(shjoin "$@")" >&3
    return 0
  fi
  log "$(shjoin "$@")"
  "$@"
}

if wants build; then
  if ! is_true "${DRY_RUN}"; then
    command -v tfds >/dev/null \
      || die "'tfds' is not on PATH: install tensorflow-datasets and tensorflow here (pip install -e \".[tf]\") or run with --steps upload,workers"
    mkdir -p "${DATA_BUILD_DIR}"
  fi
  local_run tfds build "${DATA_DATASET}" --file_format=array_record "--data_dir=${DATA_BUILD_DIR}"
fi
if wants upload; then
  if ! is_true "${DRY_RUN}"; then
    [[ -d "${DATA_BUILD_DIR}/${top}" ]] \
      || die "nothing to upload: ${DATA_BUILD_DIR}/${top} does not exist (run the build step first)"
  fi
  gcloud_run storage rsync --recursive "${DATA_BUILD_DIR}/${top}" "${source_dir}"
fi
if wants workers; then
  tpu_ssh all "mkdir -p \"\$HOME\"/tensorflow_datasets/$(shquote "${top}") && gcloud storage rsync --recursive $(shquote "${source_dir}") \"\$HOME\"/tensorflow_datasets/$(shquote "${top}")"
fi
if ! is_true "${DRY_RUN}"; then
  echo "Prepared ${DATA_DATASET}: kept in ${source_dir}; training on the workers reads it from ~/tensorflow_datasets (data.data_dir='')"
fi
