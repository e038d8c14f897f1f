#!/usr/bin/env bash
# The benchmark figures that issues 14, 15 and 16 still lack (docs/benchmarks.md), one after
# another on one GPU, most wanted first: the study's bf16 steps with and without XLA's CUDA
# graphs and as two seeds in one program (--replicas 2), their cold compile with XLA's LLVM
# compilation in parallel (a cache of its own, so that the first command's autotuning results
# do not shorten it), its teacher's step, issue 14's table (full CIFAR-10 model, bf16, batch 64 and 128,
# DDIM-100 at batch 512), packed W1A1 sampling at batch 512 (issue 15), and the LDM-4 BiDM step
# at batch 4 (issue 16). Alone in a one-GPU device call, or on a GPU that a study leaves free
# (on eight GPUs: `GPUS=7 study_session.sh start`, then
# `CUDA_VISIBLE_DEVICES=7 benchmarks/open_figures.sh $JOBS/bench &`).
#
#   benchmarks/open_figures.sh OUT [DEADLINE]
#
# DEADLINE: seconds from the start after which no command starts, and which cuts the one
# running (default 3600); LIMIT: seconds one command may take (420). Every figure is appended to
# OUT/figures.jsonl as bench.py prints it, so a command that is cut keeps the figures it had;
# OUT/open_figures.log says what ran, for how long and how it ended; OUT/<n>-<name>.log holds
# each command's stderr. One persistent compilation cache (CACHE, /tmp/open_figures_cache)
# serves every command, so a second pass loads the programs of the first.
set -u
OUT=${1:?usage: open_figures.sh OUT [DEADLINE]}
DEADLINE=${2:-3600} LIMIT=${LIMIT:-420} CACHE=${CACHE:-/tmp/open_figures_cache}
cd "$(dirname "$(realpath "$0")")/.."
mkdir -p "$OUT"
t0=$(date +%s) n=0

figures() {  # NAME XLA_FLAGS CACHE BENCH_ARGS... (CACHE '': the shared one)
  local name=$1 flags=$2 cache=${3:-$CACHE} left rc
  shift 3
  n=$((n + 1))
  left=$((DEADLINE - ($(date +%s) - t0)))
  [ $left -gt $LIMIT ] && left=$LIMIT
  if [ $left -le 10 ]; then
    echo "$name: not started (deadline)" >>"$OUT/open_figures.log"
    return
  fi
  echo "$name: XLA_FLAGS=$flags bench.py $* (limit ${left}s)" >>"$OUT/open_figures.log"
  local start=$(date +%s)
  XLA_FLAGS=$flags timeout -s TERM $left python3 -u benchmarks/bench.py \
    --compilation-cache "$cache" --iters 10 --warmup 3 "$@" \
    >>"$OUT/figures.jsonl" 2>"$OUT/$n-$name.log"
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - start)) s" >>"$OUT/open_figures.log"
}

study="--config=configs/cifar10.py:small --dtype=bfloat16"
figures study-steps "" "" $study --only xnor bidm
figures study-steps-no-cuda-graphs "--xla_gpu_enable_command_buffer=" "" $study --only xnor bidm
figures study-steps-2-replicas "" "" $study --only xnor bidm --replicas 2
figures study-steps-parallel-llvm "--xla_gpu_enable_llvm_module_compilation_parallelism=true" \
  "$CACHE-llvm" $study --only xnor bidm
figures study-teacher "" "" --config=configs/cifar10.py:small_fp --dtype=bfloat16 --only fp --train-batch 256
figures cifar10-bf16 "" "" --dtype=bfloat16 --only floor fp xnor bidm
figures cifar10-bf16-batch128 "" "" --dtype=bfloat16 --only fp xnor bidm --train-batch 128
figures cifar10-sampling-bf16 "" "" --dtype=bfloat16 --only sampling --sample-batches 512
figures packed-sampling-bf16 "" "" --dtype=bfloat16 --only packed --sample-batches 512
figures ldm4-bidm "" "" --config=configs/lsun_bedrooms_ldm4.py --train-batch 4 --only xnor bidm
echo "done after $(($(date +%s) - t0)) s" >>"$OUT/open_figures.log"
