#!/usr/bin/env bash
# The reduced CIFAR-10 study fitted into one time-boxed lease of one GPU machine (e.g. a
# 30-minute H200 session whose machine is bare at every start): the FP teacher, the reference
# statistics, the W1A1 QAT runs side by side (spread over the machine's GPUs) and their
# evaluations, all in one detached process session that outlives the short remote commands
# that start and watch it. benchmarks/cifar_reduced.py runs a study to its end; this script
# instead
#   - caps the teacher's and the runs' wall time (FP_CAP, QAT_CAP: seconds from its start;
#     SIGTERM makes a run save and exit), so the evaluations always fit the lease;
#   - compiles every distinct QAT step into JAX's persistent cache from the teacher's first
#     checkpoint while the teacher still trains, so the runs start training at once;
#   - evaluates every run at the last checkpoint step all of them reached, EMA parameters, x0
#     clipped (the figures of docs/results.md's Table 3 waves), and measures the eps error by
#     timestep of the teacher and of every run there (benchmarks/timestep_error.py).
#
#   benchmarks/study_session.sh plan            the runs `start` would start and their GPUs
#   benchmarks/study_session.sh start           the study, detached (logs in $JOBS)
#   benchmarks/study_session.sh watch SECONDS   until then or the end: progress, errors, results
#   benchmarks/study_session.sh collect DIR     into DIR (a device call's $OUT): teacher.xz and
#                                               results.tar.gz where they exist, logs.tgz (the
#                                               logs, metrics and evaluations so far, and
#                                               $JOBS/bench: open_figures.sh's output there)
#
# Settings (environment, default in brackets):
#   DATA          image folder with train/<class>/*.jpg
#   INC           the FID Inception .npz (it may arrive while the teacher trains: copy it, then
#                 `mv` it to INC)
#   TEACHER       an exported teacher folder, e.g. one kept from an earlier session: no teacher
#                 is trained, the runs start at once and the teacher is evaluated as given
#   JOBS          work folder [/tmp/study]
#   FP_STEPS, FP_CAP, FP_FLAGS   the teacher's steps [15939], wall-time cap [620] and more flags
#                 (e.g. another batch size and learning rate) []
#   QAT_STEPS, QAT_CAP, CK       the runs' steps [10000], cap [1450], checkpoint interval [1000]
#   SEEDS         seeds of the default runs ["0 1"]
#   TABLE1        1: Table 1's six other methods too, at the first seed of SEEDS [0]
#   RUNS          a file of "name flags..." lines instead [Table 3's four variants per seed]
#   GPUS          GPUs to spread the jobs over [all that nvidia-smi lists]: the teacher on GPU
#                 0, the reference statistics on the last, warm-ups from GPU 1 on, each run and
#                 its evaluation on the GPU with the fewest runs, of those the one with the
#                 fewest seeds of its variant; one GPU leaves CUDA_VISIBLE_DEVICES as it is
#   EVAL_AT_ONCE  evaluations at a time, in the runs' order, so that the first seed is scored
#                 before the second [4 per GPU]
#   EXTRA         flags added to every command, e.g. a tiny model for a dry run on a CPU
# Start CUDA MPS first on an NVIDIA GPU (`benchmarks/gpu_jobs.sh mps`). The results are
# $JOBS/results.tar.gz: every evaluation's metrics.json and a 32-sample grid, the training logs,
# timestep_error.jsonl;
# the teacher's EMA parameters are exported to $JOBS/teacher once it stops, and packed in
# bfloat16 to $JOBS/teacher.xz (about 12 MB: one file a device call can return, for a later
# session's TEACHER after `study_tools.py unpack`).
set -u
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
export JOBS=${JOBS:-/tmp/study} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2
FP_STEPS=${FP_STEPS:-15939} FP_CAP=${FP_CAP:-620} FP_FLAGS=${FP_FLAGS:-} QAT_STEPS=${QAT_STEPS:-10000}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || GPUS=1
QAT_CAP=${QAT_CAP:-1450} CK=${CK:-1000} EVAL_AT_ONCE=${EVAL_AT_ONCE:-$((4 * GPUS))} EXTRA=${EXTRA:-}
SEEDS=${SEEDS:-0 1} TABLE1=${TABLE1:-0}
G="bash benchmarks/gpu_jobs.sh"
mkdir -p "$JOBS"

default_runs() {  # Table 3: each variant once per seed of SEEDS
  local tbs="--config.binarization.learnable_k=True --config.binarization.cross_timestep=True"
  local m="--config.binarization.method" seed
  for seed in $SEEDS; do
    cat <<EOF
xnor-s$seed $m=xnor --config.seed=$seed
xnor+tbs-s$seed $m=xnor $tbs --config.seed=$seed
xnor+spd-s$seed $m=xnor --config.binarization.distillation=spd --config.seed=$seed
bidm-s$seed $m=bidm --config.seed=$seed
EOF
  done
  if [ "$TABLE1" = 1 ]; then
    seed=${SEEDS%% *}
    for method in xnorpp dorefa reactnet reste bbcu efficientdm; do
      echo "$method-s$seed $m=$method --config.seed=$seed"
    done
  fi
}

elapsed() { echo $(($(date +%s) - $(cat "$JOBS/t0"))); }
log() { echo "[$(elapsed)s] $*" >>"$JOBS/study.log"; }
running() { $G running "$1"; }
evaluations_running() {  # NAMES...: how many of their evaluations run now
  local name count=0
  for name in "$@"; do running "eval-$name" && count=$((count + 1)); done
  echo $count
}
saved_steps() { ls "$JOBS/$1/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n; }
start_job() {  # GPU NAME MAIN_ARGS...
  local gpu=$1
  shift
  if [ "$GPUS" -gt 1 ]; then
    CUDA_VISIBLE_DEVICES=$gpu $G start "$@" $EXTRA >>"$JOBS/study.out"
  else
    $G start "$@" $EXTRA >>"$JOBS/study.out"
  fi
}
start_reference() {  # once, as soon as the Inception weights are there
  if [ ! -f "$JOBS/ref.pid" ] && [ -f "$INC" ]; then
    log "reference: start on GPU $((GPUS - 1))" && start_job $((GPUS - 1)) ref "$@"
  fi
}

train_teacher() {  # QAT_FLAGS REF_FLAGS WARM_RUNS...: the FP teacher, capped; warm-ups meanwhile
  local qat=$1 ref=$2
  shift 2
  local warm=("$@")
  log "teacher: start ($FP_STEPS steps, cap ${FP_CAP}s)"
  start_job 0 fp --config=configs/cifar10.py:small_fp $d --config.training.steps=$FP_STEPS $FP_FLAGS
  local warming=0 name i
  while running fp && [ "$(elapsed)" -lt "$FP_CAP" ]; do
    start_reference $ref
    if [ $warming = 0 ] && [ -n "$(saved_steps fp)" ]; then
      warming=1
      log "warm-up compiles from teacher step $(saved_steps fp | tail -1): ${warm[*]}"
      for i in "${!warm[@]}"; do
        name=${warm[$i]}
        start_job $(((i + 1) % GPUS)) "warm-$name" $qat ${flags[$name]}
      done
    fi
    for name in "${warm[@]}"; do  # its first metrics row: the step is compiled and cached
      if [ ! -f "$JOBS/warm-$name.compiled" ] && [ -s "$JOBS/warm-$name/logs/metrics.jsonl" ]; then
        touch "$JOBS/warm-$name.compiled" && log "warm-up $name: compiled, stopping"
        kill -TERM "$(cat "$JOBS/warm-$name.pid")"  # saves and exits, as the runs do
      fi
    done
    sleep 3
  done
  running fp && log "teacher: cap reached" && $G stop fp >>"$JOBS/study.out"
  for name in "${warm[@]}"; do  # still compiling: its step never ran
    [ ! -f "$JOBS/warm-$name.compiled" ] && running "warm-$name" &&
      kill -9 "$(cat "$JOBS/warm-$name.pid")" && log "warm-up $name: cut"
  done
  log "teacher: step $(saved_steps fp | tail -1): $(tail -n1 "$JOBS/fp/logs/metrics.jsonl")"
  [ -n "$(saved_steps fp)" ] || { log "FAILED: no teacher checkpoint"; touch "$JOBS/done"; return 1; }
}

plan_runs() {  # fills names, flags[name], gpu[name] and warm (the runs to compile ahead)
  declare -gA flags=() gpu=()
  names=() warm=()
  local name rest
  while read -r name rest; do
    [ -n "$name" ] && flags[$name]=$rest && names+=("$name")
  done < <(if [ -n "${RUNS:-}" ]; then cat "$RUNS"; else default_runs; fi)
  [ ${#names[@]} -gt 0 ] || { echo "RUNS: no runs in ${RUNS:-the defaults}" >&2; return 1; }
  # one warm-up per distinct program (the seed is not part of it); each run on the GPU with
  # the fewest runs so far, of those the one with the fewest of its program
  local seen=" " key g best score min
  local -A load=() same=()
  for name in "${names[@]}"; do
    key=$(sed 's/--config.seed=[0-9]*//' <<<"${flags[$name]}")
    [[ $seen == *" $key "* ]] || { warm+=("$name"); seen+="$key "; }
    min=-1
    for ((g = 0; g < GPUS; g++)); do
      score=$((${load[$g]:-0} * 1000 + ${same[$g $key]:-0}))
      [ $min -ge 0 ] && [ $score -ge $min ] && continue
      min=$score best=$g
    done
    gpu[$name]=$best load[$best]=$((${load[$best]:-0} + 1)) same[$best $key]=$((${same[$best $key]:-0} + 1))
  done
}

plan() {  # what `start` would run: one line per run, its GPU and flags; the warm-ups
  [ -z "${RUNS:-}" ] || [ -f "$RUNS" ] || { echo "RUNS: no file $RUNS" >&2; return 2; }
  plan_runs || return 2
  local name
  for name in "${names[@]}"; do echo "$name GPU ${gpu[$name]}: ${flags[$name]}"; done
  echo "compiled ahead: ${warm[*]}"
}

timestep_errors() {  # STEP DATA_FLAGS: eps MSE by timestep of the teacher and every run at
  # STEP, in the background, one process per GPU for the runs placed on it
  local step=$1 data_flags=$2 g name teacher=${TEACHER:-$JOBS/teacher} dirs
  for ((g = 0; g < GPUS; g++)); do
    dirs=()
    [ $g = 0 ] && [ -f "$teacher/model.json" ] && dirs+=("$teacher")
    for name in "${names[@]}"; do [ "${gpu[$name]}" = $g ] && dirs+=("$JOBS/$name"); done
    [ ${#dirs[@]} -gt 0 ] || continue
    (
      [ "$GPUS" -gt 1 ] && export CUDA_VISIBLE_DEVICES=$g
      python3 benchmarks/timestep_error.py --config=configs/cifar10.py:small $data_flags $EXTRA \
        --step="$step" --workdirs="$(IFS=,; echo "${dirs[*]}")" \
        >"$JOBS/timestep_error-$g.jsonl" 2>"$JOBS/timestep_error-$g.err"
    ) &
  done
}

run_study() {
  : "${DATA:?DATA: the image folder (train/<class>/*.jpg)}" "${INC:?INC: the FID Inception .npz}"
  date +%s >"$JOBS/t0"
  local d="--config.data.source=folder --config.data.data_dir=$DATA --config.data.split=train"
  local teacher=${TEACHER:-$JOBS/fp}
  local qat="--config=configs/cifar10.py:small $d --config.training.teacher=$teacher"
  qat+=" --config.training.steps=$QAT_STEPS --config.training.checkpoint_every=$CK"
  qat+=" --config.training.keep_checkpoints=60"
  local ev="--config.eval.inception_weights=$INC --config.eval.reference=$JOBS/train_ref.npz"
  ev+=" --config.eval.pr_reference=10000 --config.eval.batch_size=1000"
  ev+=" --config.eval.keep_samples=True --config.sampling.clip_x0=True"
  ev+=" --config.eval.progress_bar=False"
  local fp_eval="--mode=evaluate --config=configs/cifar10.py:small_fp $d $ev"
  fp_eval+=" --config.sampling.checkpoint=$teacher --config.eval.num_samples=10000"
  plan_runs 2>>"$JOBS/study.log" || { log "FAILED: no runs"; touch "$JOBS/done"; return 1; }
  local ref="--mode=ref_stats --config=configs/cifar10.py:small $d $ev"
  if [ -n "${TEACHER:-}" ]; then
    log "teacher: given, $TEACHER"
  else
    train_teacher "$qat" "$ref" "${warm[@]}" || return 1
  fi
  for name in "${names[@]}"; do start_job "${gpu[$name]}" "$name" $qat ${flags[$name]}; done
  log "QAT on $GPUS GPU(s): $(for name in "${names[@]}"; do printf '%s ' "$name@${gpu[$name]}"; done)"
  if [ -z "${TEACHER:-}" ]; then  # in the background: xz takes a minute of one core
    python3 benchmarks/study_tools.py export "$JOBS/fp" "$JOBS/teacher" >>"$JOBS/study.out" 2>&1 &&
      log "teacher: exported to $JOBS/teacher" &&
      python3 benchmarks/study_tools.py pack "$JOBS/teacher" "$JOBS/teacher.xz" bfloat16 \
        >>"$JOBS/study.out" 2>&1 &&
      log "teacher: packed to $JOBS/teacher.xz ($(stat -c %s "$JOBS/teacher.xz") bytes)" &
  fi

  local evaluating=0 alive
  while true; do
    start_reference $ref
    if [ $evaluating = 0 ] && [ -f "$JOBS/train_ref.npz" ]; then
      evaluating=1 && log "teacher: evaluation" && start_job 0 eval-fp $fp_eval
    fi
    alive=0
    for name in "${names[@]}"; do running "$name" && alive=1; done
    [ $alive = 0 ] && break
    if [ "$(elapsed)" -ge "$QAT_CAP" ]; then
      log "QAT: cap reached" && $G stop "${names[@]}" >>"$JOBS/study.out"
      break
    fi
    sleep 5
  done
  local step
  step=$(for name in "${names[@]}"; do saved_steps "$name" | awk -v k="$CK" '$1 % k == 0' | tail -1; done | sort -n | head -1)
  for name in "${names[@]}"; do log "QAT $name: saved $(saved_steps "$name" | tr '\n' ' ')"; done
  [ -n "$step" ] || { log "FAILED: no step saved by every run"; touch "$JOBS/done"; return 1; }
  log "evaluations at step $step"
  timestep_errors "$step" "$d"
  while [ ! -f "$JOBS/train_ref.npz" ]; do
    start_reference $ref
    [ -f "$JOBS/ref.pid" ] && ! running ref && { log "FAILED: no reference statistics"; touch "$JOBS/done"; return 1; }
    sleep 5
  done
  [ $evaluating = 0 ] && start_job 0 eval-fp $fp_eval
  for name in "${names[@]}"; do  # in the runs' order, so a cut-off study has whole seeds
    while [ "$(evaluations_running fp "${names[@]}")" -ge "$EVAL_AT_ONCE" ]; do sleep 3; done
    log "evaluation $name: start"
    start_job "${gpu[$name]}" "eval-$name" --mode=evaluate $qat ${flags[$name]} $ev \
      --config.sampling.checkpoint="$JOBS/$name" --config.sampling.checkpoint_step="$step" \
      --config.eval.num_samples=5000
  done
  $G wait 900 >>"$JOBS/study.out"
  mkdir -p "$JOBS/results"
  for name in fp "${names[@]}"; do
    cp "$JOBS/eval-$name/metrics.json" "$JOBS/results/eval-$name.json"
    [ -f "$JOBS/$name/logs/metrics.jsonl" ] && cp "$JOBS/$name/logs/metrics.jsonl" "$JOBS/results/train-$name.jsonl"
    python3 benchmarks/study_tools.py grid "$JOBS/eval-$name/eval_samples.npz" \
      "$JOBS/results/eval-$name.png" 32 >>"$JOBS/study.out" 2>&1 &
  done
  wait
  cat "$JOBS"/timestep_error-*.jsonl >"$JOBS/results/timestep_error.jsonl" 2>/dev/null
  cp "$JOBS"/*.log "$JOBS/results/"
  tar czf "$JOBS/results.tar.gz" -C "$JOBS" results
  log "done"
  touch "$JOBS/done"
}

watch() {
  [ -f "$JOBS/t0" ] || { echo "no study in $JOBS (a fresh machine?)"; return 3; }
  local end=$(($(date +%s) + ${1:-240}))
  while [ "$(date +%s)" -lt $end ] && [ ! -f "$JOBS/done" ]; do sleep 5; done
  echo "t=$(elapsed)s"
  cat "$JOBS/study.log"
  for f in "$JOBS"/*.log; do
    local n
    n=$(basename "$f" .log)
    [ "$n" = study ] && continue
    echo "$n: $(tail -n1 "$JOBS/$n/logs/metrics.jsonl" 2>/dev/null | cut -c1-200)"
    grep -h -E "Error|Traceback" "$f" | tail -2
  done
  python3 -c 'import glob, json, os, sys  # the figures, should no file come back
keys = ("fid", "sfid", "precision", "recall", "saturated_fraction", "mean_image_std")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "eval-*", "metrics.json"))):
  m = json.load(open(f))
  print(os.path.basename(os.path.dirname(f)), "step", m["checkpoint_step"],
        *(f"{k} {m[k]:.4g}" for k in keys))' "$JOBS"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}

collect() {
  local out=${1:?usage: study_session.sh collect DIR}
  [ -f "$JOBS/t0" ] || { echo "no study in $JOBS (a fresh machine?)"; return 3; }
  mkdir -p "$out" && out=$(realpath "$out")
  local f
  for f in teacher.xz results.tar.gz; do [ -f "$JOBS/$f" ] && cp "$JOBS/$f" "$out/"; done
  (cd "$JOBS" && tar czf "$out/logs.tgz" --ignore-failed-read study.log ./*.log \
    ./*/logs/metrics.jsonl ./eval-*/metrics.json ./timestep_error-* ./bench 2>/dev/null)
  ls -l "$out"
}

main() {
  case "${1:-}" in
    start)
      : "${DATA:?DATA: the image folder (train/<class>/*.jpg)}" "${INC:?INC: the FID Inception .npz}"
      [ -d "$DATA/train" ] || { echo "DATA: no folder $DATA/train" >&2; exit 2; }
      [ -z "${TEACHER:-}" ] || [ -f "$TEACHER/model.json" ] ||
        { echo "TEACHER: $TEACHER is no exported teacher (no model.json)" >&2; exit 2; }
      [ -f "$JOBS/t0" ] && { echo "a study already runs in $JOBS"; exit 1; }
      plan >/dev/null || exit 2
      setsid nohup bash "$SELF" run >"$JOBS/study.out" 2>&1 </dev/null &
      sleep 1 && echo "study started in $JOBS"
      ;;
    run) run_study ;;
    plan) plan ;;
    watch) watch "${2:-240}" ;;
    collect) collect "${2:-}" ;;
    *) sed -n '2,/^set -u/p' "$SELF" | grep '^#' >&2 && exit 2 ;;
  esac
}

# on one line: bash reads no further, so an edit of this file cannot reach a running study
main "$@"; exit $?
