#!/usr/bin/env bash
# Cloud TPU pod launcher for bidm-jax (multi-host JAX training on a TPU VM slice).
#
# Run `launch/tpu_pod.sh help` for the subcommands and settings; launch/README.md has the
# whole CIFAR-10 recipe. DRY_RUN=1 prints every command (gcloud, and the local tar of
# `install`) exactly as it would run, one per line, and runs nothing.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: [VAR=value ...] launch/tpu_pod.sh SUBCOMMAND [-- EXTRA_MAIN_FLAGS...]

Subcommands (all workers = every host of the slice, through --worker=all):
  create           create the TPU VM slice (gcloud compute tpus tpu-vm create)
  install          copy this checkout (or clone REPO_URL) to all workers, make a Python venv
                   there and pip install -e the repo with 'jax[tpu]' and gcsfs
  check            all workers: jax.distributed.initialize(); print process index and
                   global/local device counts (proves the slice and install work)
  prepare-data     worker 0: build the TFDS dataset $TFDS_DATASET as array_record and
                   publish it to gs://$BUCKET/tfds (installs tensorflow-cpu in a separate
                   venv there, and tensorflow-io for LSUN's lmdb archives)
  convert-teacher  copy TEACHER_SOURCE (a downloaded PyTorch checkpoint of CONFIG's model:
                   DDPM CIFAR-10, or a CompVis LDM .ckpt) to worker 0, convert it
                   (--mode=convert) and upload to $TEACHER_GCS
  train            all workers: start python -m bidm_jax.main --distributed --mode=train
                   under nohup (log: ~/bidm-logs/$RUN_NAME.log on each worker); a later
                   `train` with the same RUN_NAME/WORKDIR resumes from the last checkpoint
  status           describe the TPU, and whether training runs on each worker
  logs             print the end of the training log of worker $WORKER (FOLLOW=1: tail -f)
  stop             all workers: SIGTERM the training process (it checkpoints, then exits;
                   STOP_SIGNAL=KILL ends it at once)
  delete           delete the TPU VM slice (asks to confirm unless YES=1)
  help             this text
Arguments after `--` are appended to the python -m bidm_jax.main command (train only).

Settings (environment variables, default in brackets):
  PROJECT          GCP project [gcloud's configured project]
  ZONE             zone [us-central2-b, the v4 zone; v5p: e.g. europe-west4-b]
  TPU_NAME         TPU VM name [bidm-tpu]
  ACCELERATOR      accelerator type, e.g. v4-32, v5p-64, v5litepod-16, v6e-16 [v4-32]
  RUNTIME_VERSION  TPU software version [from ACCELERATOR: v2/v3/v4 tpu-ubuntu2204-base,
                   v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e]
  SPOT=1 | PREEMPTIBLE=1   create a Spot / preemptible TPU [off]
  SERVICE_ACCOUNT  service account of the TPU VMs [the default compute service account]
  CREATE_FLAGS     more words for `tpu-vm create`, e.g. '--network=NET --subnetwork=SUB'
  BUCKET           GCS bucket (name or gs://name) for data, teacher and runs [required by
                   prepare-data, convert-teacher, train]
  CONFIG           config file[:variant] relative to the repo [configs/cifar10.py]
  RUN_NAME         run name [from CONFIG: cifar10, or cifar10-fp for configs/cifar10.py:fp]
  WORKDIR          training workdir [gs://$BUCKET/runs/$RUN_NAME]
  DATA_DIR         TFDS data dir [gs://$BUCKET/tfds]
  TFDS_DATASET     what prepare-data builds [from CONFIG: cifar10, lsun/bedroom for
                   lsun_bedrooms_ldm4.py, lsun/church_outdoor for lsun_churches_ldm8.py]
  TEACHER          FP teacher for QAT (--config.training.teacher) [none; train refuses a
                   QAT run without one: set TEACHER=$TEACHER_GCS after convert-teacher]
  TEACHER_SOURCE   local PyTorch checkpoint file or folder for convert-teacher
  TEACHER_GCS      where convert-teacher uploads to [gs://$BUCKET/teachers/ddpm-cifar10 for
                   configs/cifar10.py, else gs://$BUCKET/teachers/$RUN_NAME]
  EXTRA_FLAGS      more flags for bidm_jax.main, split on spaces, e.g.
                   '--config.training.steps=1000 --config.training.progress_bar=false'
  REPO_URL         git URL to clone on the workers instead of copying this checkout
  REPO_REF         git ref to check out with REPO_URL [HEAD]
  REMOTE_DIR       repo folder on the workers, relative to the remote home [bidm-jax]
  REMOTE_VENV      venv folder on the workers, relative to the remote home [bidm-venv]
  PYTHON_VERSION   Python of the venv (uv fetches it; the images' python3 is 3.10) [3.11]
  WORKER           worker whose log `logs` shows [0]; LINES: how many lines [100]
  STOP_SIGNAL      signal `stop` sends [TERM]
  YES=1            delete without asking
  DRY_RUN=1        print the commands instead of running them
EOF
}

die() { printf 'tpu_pod.sh: error: %s\n' "$*" >&2; exit 2; }

# --- settings ---------------------------------------------------------------------------
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-bidm-tpu}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"
CREATE_FLAGS="${CREATE_FLAGS:-}"
BUCKET="${BUCKET:-}"
CONFIG="${CONFIG:-configs/cifar10.py}"
RUN_NAME="${RUN_NAME:-}"
WORKDIR="${WORKDIR:-}"
DATA_DIR="${DATA_DIR:-}"
TFDS_DATASET="${TFDS_DATASET:-}"
TEACHER="${TEACHER:-}"
TEACHER_SOURCE="${TEACHER_SOURCE:-}"
TEACHER_GCS="${TEACHER_GCS:-}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-HEAD}"
REMOTE_DIR="${REMOTE_DIR:-bidm-jax}"
REMOTE_VENV="${REMOTE_VENV:-bidm-venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
WORKER="${WORKER:-0}"
LINES="${LINES:-100}"
FOLLOW="${FOLLOW:-0}"
STOP_SIGNAL="${STOP_SIGNAL:-TERM}"
YES="${YES:-0}"
DRY_RUN="${DRY_RUN:-0}"

LOCAL_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="bidm-jax-src.tar.gz"      # name of the source archive on the workers' home
TFDS_VENV="bidm-tfds-venv"         # worker 0's separate venv for tensorflow (prepare-data)
# shellcheck disable=SC2016  # expanded on the workers, not here
LOG_DIR='"$HOME"/bidm-logs'

# --- quoting and running ----------------------------------------------------------------
# q WORD: WORD quoted for a POSIX shell (unchanged when it needs no quotes).
q() {
  local s=$1 sq="'" esc="'\\''"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$esc}"
  fi
}

# qjoin WORD...: the words quoted and joined by spaces, one shell command line.
qjoin() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

# run CMD ARG...: runs the command, or prints it when DRY_RUN=1 (stdout, copy-pastable).
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(qjoin "$@")"
  else
    printf '+ %s\n' "$(qjoin "$@")" >&2
    "$@"
  fi
}

# run_sh 'SHELL LINE': a local pipeline, printed verbatim under DRY_RUN=1.
run_sh() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
    bash -c "set -euo pipefail; $1"
  fi
}

gcloud_scope=(--zone="$ZONE")
[[ -n $PROJECT ]] && gcloud_scope+=(--project="$PROJECT")

# tpu_ssh WORKER 'REMOTE BASH SCRIPT'
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_scope[@]}" --worker="$1" \
    --command "$2"
}

# --- derived settings -------------------------------------------------------------------
need() {  # need VAR 'why': fails with a message when VAR is empty
  [[ -n ${!1} ]] || die "$1 is not set: $2 (see 'launch/tpu_pod.sh help')"
}

run_name_default() {  # RUN_NAME from CONFIG: configs/cifar10.py:fp -> cifar10-fp
  if [[ -z $RUN_NAME ]]; then
    local base="${CONFIG%%:*}" variant=""
    [[ $CONFIG == *:* ]] && variant="-${CONFIG#*:}"
    base="$(basename "$base")"
    RUN_NAME="${base%.py}${variant}"
  fi
}

bucket_settings() {
  need BUCKET "set BUCKET=your-gcs-bucket (name or gs://name) for data, teacher and runs"
  BUCKET="${BUCKET#gs://}"
  BUCKET="${BUCKET%/}"
  [[ $BUCKET != */* && -n $BUCKET ]] || die "BUCKET=$BUCKET: give a bucket name, not a path"
  run_name_default
  WORKDIR="${WORKDIR:-gs://$BUCKET/runs/$RUN_NAME}"
  DATA_DIR="${DATA_DIR:-gs://$BUCKET/tfds}"
  local teacher=$RUN_NAME
  [[ $(basename "${CONFIG%%:*}") == cifar10.py ]] && teacher=ddpm-cifar10
  TEACHER_GCS="${TEACHER_GCS:-gs://$BUCKET/teachers/$teacher}"
  TEACHER_GCS="${TEACHER_GCS%/}"
}

runtime_version() {  # sets RUNTIME_VERSION from ACCELERATOR unless it is set
  [[ -n $RUNTIME_VERSION ]] && return 0
  case "$ACCELERATOR" in
    v2-*|v3-*|v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default TPU software version for ACCELERATOR=$ACCELERATOR; set RUNTIME_VERSION" ;;
  esac
}

# JAX devices of the slice: v4/v5p count 2 TensorCores per chip (one JAX device per chip),
# v2/v3/v5e/v6e name the number of devices.
device_count() {
  local n="${ACCELERATOR##*-}"
  [[ $n =~ ^[0-9]+$ ]] || { printf ''; return; }
  case "$ACCELERATOR" in
    v4-*|v5p-*) printf '%d' $((n / 2)) ;;
    *) printf '%d' "$n" ;;
  esac
}

# rpath PATH: a worker path for the remote shell; relative ones are under the remote home.
# shellcheck disable=SC2016  # "$HOME" is for the remote shell
rpath() {
  if [[ $1 == /* ]]; then q "$1"; else printf '"$HOME"/%s' "$(q "$1")"; fi
}

# The remote script prefix: strict mode, the venv's python first on PATH, the repo as cwd.
# shellcheck disable=SC2016  # "$PATH" is for the remote shell
remote_env() {
  printf 'set -euo pipefail; export PATH=%s/bin:"$PATH"; cd %s' "$(rpath "$REMOTE_VENV")" \
    "$(rpath "$REMOTE_DIR")"
}

# --- subcommands ------------------------------------------------------------------------
cmd_create() {
  runtime_version
  local args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_scope[@]}"
              --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION")
  [[ $SPOT == 1 && $PREEMPTIBLE == 1 ]] && die "SPOT=1 and PREEMPTIBLE=1: choose one"
  [[ $SPOT == 1 ]] && args+=(--spot)
  [[ $PREEMPTIBLE == 1 ]] && args+=(--preemptible)
  [[ -n $SERVICE_ACCOUNT ]] && args+=(--service-account="$SERVICE_ACCOUNT")
  if [[ -n $CREATE_FLAGS ]]; then
    local extra
    read -r -a extra <<<"$CREATE_FLAGS"
    args+=("${extra[@]}")
  fi
  run "${args[@]}"
}

cmd_install() {
  local d v get_src
  d="$(rpath "$REMOTE_DIR")"
  v="$(rpath "$REMOTE_VENV")"
  if [[ -n $REPO_URL ]]; then
    get_src="if [ -d $d/.git ]; then git -C $d fetch --quiet origin $(q "$REPO_REF") && git -C $d checkout --quiet --force FETCH_HEAD; else git clone --quiet $(q "$REPO_URL") $d && git -C $d checkout --quiet $(q "$REPO_REF"); fi"
  else
    # This checkout as it is (tracked and untracked, not ignored, files), to every worker.
    local tarball
    tarball="${TMPDIR:-/tmp}/$TARBALL"
    run_sh "cd $(q "$LOCAL_REPO") && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do if [ -e \"\$f\" ]; then printf '%s\\0' \"\$f\"; fi; done | COPYFILE_DISABLE=1 tar --null -T - -czf $(q "$tarball")"
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$TARBALL" "${gcloud_scope[@]}" \
      --worker=all
    get_src="mkdir -p $d && tar -xzf \"\$HOME\"/$TARBALL -C $d && rm -f \"\$HOME\"/$TARBALL"
  fi
  tpu_ssh all "set -euo pipefail; $get_src; python3 -m pip install --user --quiet --upgrade uv; export PATH=\"\$HOME/.local/bin:\$PATH\"; [ -x $v/bin/python ] || uv venv --quiet --python $(q "$PYTHON_VERSION") $v; uv pip install --quiet --python $v/bin/python -e $d \"jax[tpu]\" gcsfs \"array_record>=0.8.6\"; echo \"\$(hostname): installed\""
}

cmd_check() {
  tpu_ssh all "$(remote_env); out=\$(python -c \"import jax; jax.distributed.initialize(); print(jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count())\"); echo \"\$(hostname): process index, process count, devices, local devices: \$out\""
}

tfds_dataset() {  # sets TFDS_DATASET from CONFIG (the configs' data.name) unless it is set
  [[ -n $TFDS_DATASET ]] && return 0
  case "$(basename "${CONFIG%%:*}" .py)" in
    cifar10) TFDS_DATASET=cifar10 ;;
    lsun_bedrooms_ldm4) TFDS_DATASET=lsun/bedroom ;;
    lsun_churches_ldm8) TFDS_DATASET=lsun/church_outdoor ;;
    ffhq_ldm4) die "CONFIG=$CONFIG reads an image folder (--config.data.source=folder), not TFDS: copy FFHQ to each host or a bucket instead (docs/ldm.md)" ;;
    *) die "no TFDS dataset known for CONFIG=$CONFIG; set TFDS_DATASET" ;;
  esac
}

cmd_prepare_data() {
  bucket_settings
  tfds_dataset
  [[ $DATA_DIR == gs://* ]] || die "DATA_DIR=$DATA_DIR: prepare-data publishes to a gs:// path"
  # array_record cannot be written straight to GCS: build on worker 0's disk, then publish.
  local t extra=""
  t="$(rpath "$TFDS_VENV")"
  [[ $TFDS_DATASET == lsun/* ]] && extra=" tensorflow-io"  # TFDS reads LSUN's lmdb through it
  tpu_ssh 0 "set -euo pipefail; python3 -m pip install --user --quiet --upgrade uv; export PATH=\"\$HOME/.local/bin:\$PATH\"; [ -x $t/bin/python ] || uv venv --quiet --python $(q "$PYTHON_VERSION") $t; uv pip install --quiet --python $t/bin/python tensorflow-cpu tensorflow-datasets$extra; $t/bin/tfds build $(q "$TFDS_DATASET") --file_format=array_record --data_dir=\"\$HOME/tensorflow_datasets\" --publish_dir=$(q "$DATA_DIR") --skip_if_published"
}

cmd_convert_teacher() {
  bucket_settings
  need TEACHER_SOURCE "set TEACHER_SOURCE=path to the downloaded PyTorch checkpoint (file or folder; docs/convert.md for DDPM CIFAR-10, docs/ldm.md for CompVis LDMs)"
  [[ $DRY_RUN == 1 || -e $TEACHER_SOURCE ]] || die "TEACHER_SOURCE=$TEACHER_SOURCE does not exist"
  [[ $TEACHER_GCS == gs://* ]] || die "TEACHER_GCS=$TEACHER_GCS: give a gs:// path"
  local src name target parent
  src="${TEACHER_SOURCE%/}"
  name="$(basename "$src")"
  target="$(basename "$TEACHER_GCS")"
  parent="$(dirname "$TEACHER_GCS")/"
  tpu_ssh 0 "rm -rf \"\$HOME\"/teacher-src \"\$HOME\"/teacher-out && mkdir -p \"\$HOME\"/teacher-src \"\$HOME\"/teacher-out"
  run gcloud compute tpus tpu-vm scp "$src" "$TPU_NAME:teacher-src/" "${gcloud_scope[@]}" \
    --worker=0 --recurse
  # Convert on the CPU into a local folder named like the GCS target, then copy that folder
  # into the target's parent, so the upload lands exactly at TEACHER_GCS.
  tpu_ssh 0 "$(remote_env); JAX_PLATFORMS=cpu python -m bidm_jax.main --mode=convert --config=$(q "${CONFIG%%:*}") --config.convert.source=\"\$HOME\"/teacher-src/$(q "$name") --workdir=\"\$HOME\"/teacher-out/$(q "$target"); gcloud storage cp --recursive \"\$HOME\"/teacher-out/$(q "$target") $(q "$parent")"
  [[ $DRY_RUN == 1 ]] || printf 'converted teacher: %s (train with TEACHER=%s)\n' "$TEACHER_GCS" "$TEACHER_GCS" >&2
}

main_flags() {  # the python -m bidm_jax.main command of `train`, one word per element
  MAIN=(python -m bidm_jax.main --distributed --mode=train --config="$CONFIG"
        --workdir="$WORKDIR" --config.data.data_dir="$DATA_DIR")
  [[ -n $TEACHER ]] && MAIN+=(--config.training.teacher="$TEACHER")
  if [[ -n $EXTRA_FLAGS ]]; then
    local extra
    read -r -a extra <<<"$EXTRA_FLAGS"
    MAIN+=("${extra[@]}")
  fi
  MAIN+=("$@")
}

cmd_train() {
  bucket_settings
  main_flags "$@"
  local all=" ${MAIN[*]} "
  # QAT (every method but fp) needs a teacher; fail here rather than on every worker.
  if [[ -z $TEACHER && $CONFIG != *:fp && $all != *" --config.training.teacher="* \
        && $all != *" --config.binarization.method=fp "* ]]; then
    die "TEACHER is not set: QAT with $CONFIG needs the full-precision teacher. Run convert-teacher (or train CONFIG=configs/cifar10.py:fp) first, then set TEACHER=$TEACHER_GCS (or a gs:// FP workdir)"
  fi
  local devices batch
  devices="$(device_count)"
  batch="$(printf '%s\n' "${MAIN[@]}" | sed -n 's/^--config\.training\.batch_size=//p' | tail -n 1)"
  if [[ -n $devices && -n $batch && $batch =~ ^[0-9]+$ ]] && (( batch % devices )); then
    die "--config.training.batch_size=$batch is the global batch; it must divide by the $devices devices of $ACCELERATOR"
  fi
  local pidfile logfile
  pidfile="$LOG_DIR/$(q "$RUN_NAME").pid"
  logfile="$LOG_DIR/$(q "$RUN_NAME").log"
  tpu_ssh all "$(remote_env); mkdir -p $LOG_DIR; if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then echo \"\$(hostname): already training (pid \$(cat $pidfile)); stop it first\" >&2; exit 1; fi; nohup $(qjoin "${MAIN[@]}") >>$logfile 2>&1 </dev/null & echo \$! >$pidfile; echo \"\$(hostname): started pid \$!, log $logfile\""
}

cmd_status() {
  run_name_default
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gcloud_scope[@]}"
  local pidfile logfile
  pidfile="$LOG_DIR/$(q "$RUN_NAME").pid"
  logfile="$LOG_DIR/$(q "$RUN_NAME").log"
  tpu_ssh all "if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then echo \"\$(hostname): training $(q "$RUN_NAME") (pid \$(cat $pidfile))\"; else echo \"\$(hostname): $(q "$RUN_NAME") not running\"; fi; [ -f $logfile ] && tail -c 400 $logfile | tr \"\\r\" \"\\n\" | tail -n 1 || true"
}

cmd_logs() {
  run_name_default
  local logfile
  logfile="$LOG_DIR/$(q "$RUN_NAME").log"
  if [[ $FOLLOW == 1 ]]; then
    tpu_ssh "$WORKER" "tail -n $(q "$LINES") -f $logfile"
  else
    tpu_ssh "$WORKER" "tr \"\\r\" \"\\n\" <$logfile | tail -n $(q "$LINES")"
  fi
}

cmd_stop() {
  run_name_default
  local pidfile
  pidfile="$LOG_DIR/$(q "$RUN_NAME").pid"
  [[ $STOP_SIGNAL =~ ^[A-Z0-9]+$ ]] || die "STOP_SIGNAL=$STOP_SIGNAL: give a signal name such as TERM or KILL"
  tpu_ssh all "if [ -f $pidfile ] && kill -$STOP_SIGNAL \"\$(cat $pidfile)\" 2>/dev/null; then echo \"\$(hostname): sent SIG$STOP_SIGNAL to pid \$(cat $pidfile)\"; else echo \"\$(hostname): $(q "$RUN_NAME") not running\"; fi"
}

cmd_delete() {
  local args=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_scope[@]}")
  [[ $YES == 1 ]] && args+=(--quiet)
  run "${args[@]}"
}

# --- dispatch ---------------------------------------------------------------------------
main() {
  local sub="${1:-}"
  [[ $# -gt 0 ]] && shift
  if [[ ${1:-} == -- ]]; then shift; fi
  if [[ $# -gt 0 && $sub != train ]]; then
    die "$sub takes no arguments (got: $*); only 'train -- FLAGS...' passes flags"
  fi
  case "$sub" in
    create) cmd_create ;;
    install) cmd_install ;;
    check) cmd_check ;;
    prepare-data) cmd_prepare_data ;;
    convert-teacher) cmd_convert_teacher ;;
    train) cmd_train "$@" ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    help|-h|--help) usage ;;
    "") usage >&2; exit 2 ;;
    *) usage >&2; die "unknown subcommand '$sub'" ;;
  esac
}

main "$@"
