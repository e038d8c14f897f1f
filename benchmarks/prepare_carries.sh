#!/usr/bin/env bash
# Builds, on the development machine, the ignored folders that one call to a lent GPU machine
# carries for the reduced CIFAR-10 study (docs/results.md, "Carrying everything in one call"),
# and lists them in .git/info/exclude. A call carries 64 MiB with the repository; these come
# to about 65.4 MB, so the call also needs docs/ moved out of the checkout while it starts.
#
#   benchmarks/prepare_carries.sh DATA [TEACHER]
#
#   .whl     cp312 wheels the GPU machine lacks, at this machine's installed versions, except
#            array-record (3.8 MB), which grain imports but folder data never uses: the call
#            writes a stub for it (docs/results.md)
#   .carry1  cifar-train.tar.xz: train/ of DATA/cifar10-jpeg.tar.xz (15.4 MB)
#   .carry2  inception.xz: DATA/fid-inception-2015-12-05-fp16.npz, packed losslessly (36.8 MB)
#   .carry3  teacher.xz: TEACHER (an exported folder, packed here in bfloat16, 12.3 MB; or
#            a teacher.xz that a device call returned, copied as it is); only when TEACHER
#            is given
set -euo pipefail
DATA=${1:?usage: prepare_carries.sh DATA [TEACHER]}
TEACHER=${2:-}
cd "$(dirname "$0")/.."
for f in cifar10-jpeg.tar.xz fid-inception-2015-12-05-fp16.npz; do
  [ -f "$DATA/$f" ] || { echo "DATA: no $DATA/$f" >&2; exit 2; }
done
[ -z "$TEACHER" ] || [ -f "$TEACHER/model.json" ] || [[ -f $TEACHER && $TEACHER == *.xz ]] ||
  { echo "TEACHER: $TEACHER is neither an exported teacher (no model.json) nor a .xz" >&2; exit 2; }
exclude=$(git rev-parse --git-path info/exclude)
for d in .whl .carry1 .carry2 .carry3; do
  grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >>"$exclude"
done

rm -rf .whl && mkdir -p .whl
platforms=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=" --platform ${p}_x86_64"
done
for name in ml_collections grain dm-tree portpicker flatbuffers; do
  version=$(python3 -m pip show "$name" | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "$name is not installed here (pip install -e '.[test]')" >&2; exit 2; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $platforms --platform any -d .whl "$name==$version"
done

mkdir -p .carry1 .carry2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar xJf "$DATA/cifar10-jpeg.tar.xz" -C "$tmp" train
tar cf - -C "$tmp" train | xz -9e -T2 >.carry1/cifar-train.tar.xz.part
mv .carry1/cifar-train.tar.xz.part .carry1/cifar-train.tar.xz
python3 benchmarks/study_tools.py pack "$DATA/fid-inception-2015-12-05-fp16.npz" .carry2/inception.xz
if [ -n "$TEACHER" ]; then
  mkdir -p .carry3
  if [ -d "$TEACHER" ]; then
    python3 benchmarks/study_tools.py pack "$TEACHER" .carry3/teacher.xz bfloat16
  else
    cp "$TEACHER" .carry3/teacher.xz
  fi
fi
du -cb .whl .carry* | tail -1 | awk '{printf "carries: %.1f MB\n", $1 / 1e6}'
