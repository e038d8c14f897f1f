# Sourced first in a device call of the reduced CIFAR-10 study (docs/results.md), in the root
# of the carried checkout, on a bare GPU machine:
#
#   source benchmarks/device_setup.sh || exit 1
#
# It installs the carried wheels (.whl) into /tmp/site, with a stub for array_record, which
# grain imports at start-up and folder data never uses (its 3.8 MB wheel is left behind);
# copies the code to /tmp/repo, from which a detached study keeps running while later calls
# replace the checkout; unpacks what was carried of .carry1 (the training images) into
# /tmp/cifar, .carry2 (the FID Inception) to /tmp/inc.npz in the background (study_session.sh
# waits for it) and .carry3 (a kept teacher) into /tmp/teacher, exporting DATA, INC and TEACHER
# for each; starts CUDA MPS; and exports PYTHONPATH and JOBS. A benchmark-only call carries
# .whl alone. benchmarks/prepare_carries.sh builds the carried folders.
_setup() {
  local site=/tmp/site stub=/tmp/site/array_record/python
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target $site .whl/*.whl || { echo "device_setup: the wheels of .whl did not install" >&2; return 1; }
  mkdir -p $stub && touch $stub/../__init__.py $stub/__init__.py &&
    printf 'ArrayRecordDataSource = PathLikeOrFileInstruction = object\n' >$stub/array_record_data_source.py
  mkdir -p /tmp/repo && cp -r bidm_jax benchmarks configs /tmp/repo/ || return 1
  export PYTHONPATH=/tmp/repo:$site PYTHONUNBUFFERED=1 JOBS=${JOBS:-/tmp/study}
  if [ -f .carry1/cifar-train.tar.xz ]; then
    mkdir -p /tmp/cifar && tar xJf .carry1/cifar-train.tar.xz -C /tmp/cifar || return 1
    export DATA=/tmp/cifar
  fi
  if [ -f .carry2/inception.xz ]; then
    export INC=/tmp/inc.npz
    (python3 /tmp/repo/benchmarks/study_tools.py unpack .carry2/inception.xz /tmp/inc.part.npz &&
      mv /tmp/inc.part.npz $INC) >/tmp/unpack.log 2>&1 &
  fi
  if [ -f .carry3/teacher.xz ]; then
    python3 /tmp/repo/benchmarks/study_tools.py unpack .carry3/teacher.xz /tmp/teacher || return 1
    export TEACHER=/tmp/teacher
  fi
  bash /tmp/repo/benchmarks/gpu_jobs.sh mps
  nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
  python3 -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__)'
  date -u
}
_setup
