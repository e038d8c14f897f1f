#!/usr/bin/env bash
# Background training jobs that outlive one short remote command (e.g. a 10-minute call to a
# lent GPU machine): each job is `python -m bidm_jax.main` in its own process session, logging
# to $JOBS/<name>.log; a later command waits for it, stops it (SIGTERM: the run saves a
# checkpoint at its current step and exits 0) or reads its progress.
#
#   benchmarks/gpu_jobs.sh start NAME MAIN_ARGS...   start a job; its workdir is $JOBS/NAME
#   benchmarks/gpu_jobs.sh wait SECONDS [NAME...]    until those jobs (default: all) end or
#                                                    SECONDS pass; prints each job's last log line
#   benchmarks/gpu_jobs.sh stop NAME...              SIGTERM and wait until the job has saved
#   benchmarks/gpu_jobs.sh status                    the last metrics row of every job
#   benchmarks/gpu_jobs.sh running NAME              exit status 0 while the job runs
#   benchmarks/gpu_jobs.sh mps                       start CUDA MPS (as root), so that the jobs'
#                                                    kernels share the GPU side by side rather
#                                                    than in time slices; quit it again when a
#                                                    first CUDA program fails under it
set -euo pipefail
JOBS=${JOBS:-/tmp/jobs}
mkdir -p "$JOBS"
cmd=${1:?usage: gpu_jobs.sh start|wait|stop|status ...}
shift

running() { [ -f "$JOBS/$1.pid" ] && kill -0 "$(cat "$JOBS/$1.pid")" 2>/dev/null; }
names() { if [ $# -gt 0 ]; then echo "$@"; else ls "$JOBS" | sed -n 's/\.pid$//p'; fi; }
last_row() { tail -n 1 "$JOBS/$1/logs/metrics.jsonl" 2>/dev/null || echo "(no metrics yet)"; }

case "$cmd" in
  start)
    name=$1; shift
    setsid nohup "${PYTHON:-python3}" -m bidm_jax.main --workdir="$JOBS/$name" "$@" \
      >"$JOBS/$name.log" 2>&1 </dev/null &
    echo $! >"$JOBS/$name.pid"
    echo "started $name (pid $!)"
    ;;
  wait)
    deadline=$(( $(date +%s) + ${1:?seconds} )); shift
    while [ "$(date +%s)" -lt "$deadline" ]; do
      alive=0
      for n in $(names "$@"); do running "$n" && alive=1; done
      [ "$alive" = 0 ] && break
      sleep 10
    done
    for n in $(names "$@"); do
      state=$(running "$n" && echo running || echo ended)
      echo "$n: $state: $(last_row "$n")"
    done
    ;;
  stop)
    for n in "$@"; do running "$n" && kill -TERM "$(cat "$JOBS/$n.pid")"; done
    for n in "$@"; do
      while running "$n"; do sleep 1; done
      echo "$n stopped: $(last_row "$n")"
    done
    ;;
  status)
    for n in $(names); do echo "$n: $(last_row "$n")"; done
    ;;
  running)
    running "${1:?usage: gpu_jobs.sh running NAME}"
    ;;
  mps)
    command -v nvidia-cuda-mps-control >/dev/null || { echo "no nvidia-cuda-mps-control here" >&2; exit 1; }
    nvidia-cuda-mps-control -d
    if XLA_PYTHON_CLIENT_MEM_FRACTION=0.05 timeout 60 "${PYTHON:-python3}" -c \
        "import jax, jax.numpy as jnp; print(jax.devices(), float(jnp.ones((256, 256)).sum()))"; then
      echo "MPS on"
    else
      echo quit | nvidia-cuda-mps-control
      echo "MPS failed its first program and is off again" >&2
      exit 1
    fi
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
