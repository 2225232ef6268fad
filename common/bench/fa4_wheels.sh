#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4 and its CuTe-DSL stack) for the GPU machine, in two device
# calls: the stack is about 100 MB, of which the CUDA 13 library wheel of nvidia-cutlass-dsl
# is 92 MB, and one call carries at most 64 MiB with the working tree. The GPU machine has no
# package index; it has python 3.12, torch (CUDA 13), triton, einops, protobuf,
# typing-extensions and cuda-bindings, which the stack also needs.
#
#   bash common/bench/fa4_wheels.sh fetch       here, with the package index: fills .fa4a/ and
#                                               .fa4b/ (git-ignored through .git/info/exclude)
#   device call 1, carry [".fa4a"]:   bash common/bench/fa4_wheels.sh stage
#   device call 2, carry [".fa4b"], right after (the machine keeps /tmp only while warm):
#       bash common/bench/fa4_wheels.sh install; CAP=570 bash common/bench/run_gpu.sh fa4
#
# fetch    pip-downloads the pinned wheels below for cp312 manylinux x86-64, packs the unpacked
#          nvidia-cutlass-dsl-libs-cu13 wheel as one xz tar (about 59 MiB against 88 MiB zipped)
#          and splits it: .fa4a/ holds its first 40 MiB, .fa4b/ the rest and every other wheel;
#          SHA256SUMS in both. Fails if either folder reaches 56 MiB (what the 64 MiB of a call
#          leave beside the tracked tree). FA4_CACHE: where the downloads go (default
#          /tmp/fa4_download; kept, so a second fetch downloads nothing).
# stage    (device, call 1) copies .fa4a/* to /tmp/fa4stage/.
# install  (device, call 2) copies .fa4b/* there (and .fa4a/* if the machine still has it),
#          checks the sums, pip-installs the wheels into /tmp/site (--no-index --no-deps
#          --target), then unpacks the library over them (pip --target would skip, or with
#          --upgrade replace, the nvidia_cutlass_dsl/ folder the two share), and imports
#          flash_attn.cute. Use it with
#          PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages (the CuTe DSL's
#          folder is added by a .pth file, which PYTHONPATH does not read); run_gpu.sh fa4
#          does that.
set -euo pipefail
cd "$(dirname "$0")/../.."

PINS=(
  flash-attn-4==4.0.0b40
  nvidia-cutlass-dsl==4.8.1
  nvidia-cutlass-dsl-libs-base==4.8.1
  nvidia-cutlass-dsl-libs-core==4.8.1
  nvidia-cutlass-dsl-libs-cu13==4.8.1
  quack-kernels==0.6.5
  apache-tvm-ffi==0.1.15.post2
  torch-c-dlpack-ext==0.1.5
  nvidia-cudnn-frontend==1.32.0
)
LIB=nvidia_cutlass_dsl_libs_cu13
PART_MIB=40
LIMIT_MIB=56
STAGE="${FA4_STAGE:-/tmp/fa4stage}"
SITE="${FA4_SITE:-/tmp/site}"

fetch() {
  local dl="${FA4_CACHE:-/tmp/fa4_download}" work
  mkdir -p "$dl"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dl" "${PINS[@]}"
  local lib_whl
  lib_whl="$(ls "$dl"/${LIB}-4.8.1-*.whl)"
  rm -rf .fa4a .fa4b
  mkdir -p .fa4a .fa4b
  work="$(mktemp -d)"
  # the library's files (with the modes the wheel gives them) as one reproducible xz tar
  # (sorted, no owners or times)
  python3 - "$lib_whl" "$work/u" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode)
PY
  tar -C "$work/u" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - . \
    | xz -T0 -9 > "$work/$LIB.tar.xz"
  split -b "${PART_MIB}M" -d -a 2 "$work/$LIB.tar.xz" "$work/$LIB.tar.xz.part"
  mv "$work/$LIB.tar.xz.part00" .fa4a/
  mv "$work"/$LIB.tar.xz.part* .fa4b/
  for pin in "${PINS[@]}"; do
    [ "${pin%%==*}" = nvidia-cutlass-dsl-libs-cu13 ] && continue
    local name="${pin%%==*}" version="${pin##*==}"
    cp "$dl/${name//-/_}-${version}-"*.whl .fa4b/
  done
  (cd "$work" && sha256sum "$LIB.tar.xz") > .fa4b/SHA256SUMS
  (cd .fa4a && sha256sum -- *) >> .fa4b/SHA256SUMS
  (cd .fa4b && sha256sum -- *.part* *.whl) >> .fa4b/SHA256SUMS
  cp .fa4b/SHA256SUMS .fa4a/
  rm -rf "$work"
  for line in /.fa4a/ /.fa4b/; do
    grep -qxF "$line" .git/info/exclude 2>/dev/null || echo "$line" >> .git/info/exclude
  done
  local bad=0 bytes d
  for d in .fa4a .fa4b; do
    bytes=$(du -sb "$d" | cut -f1)
    echo "$d: $(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }') MiB" \
         "(limit ${LIMIT_MIB} MiB): $(ls "$d" | tr '\n' ' ')"
    [ "$bytes" -lt $((LIMIT_MIB * 1048576)) ] || bad=1
    git check-ignore -q "$d" || { echo "fa4_wheels: $d is not git-ignored"; exit 1; }
  done
  [ "$bad" = 0 ] || { echo "fa4_wheels: a folder is too large for one device call"; exit 1; }
}

stage() {
  [ -f ".fa4a/$LIB.tar.xz.part00" ] || { echo "fa4_wheels: no .fa4a/ (carry it)"; exit 1; }
  mkdir -p "$STAGE"
  cp .fa4a/* "$STAGE/"
  (cd "$STAGE" && grep "part00" SHA256SUMS | sha256sum -c --quiet -) \
    && echo "staged $(du -sh "$STAGE" | cut -f1) in $STAGE: now install, in the next call"
}

install() {
  [ -d .fa4b ] || { echo "fa4_wheels: no .fa4b/ (carry it)"; exit 1; }
  mkdir -p "$STAGE"
  [ -f ".fa4a/$LIB.tar.xz.part00" ] && cp .fa4a/* "$STAGE/"  # still here from call 1
  cp .fa4b/* "$STAGE/"
  cd "$STAGE"
  [ -f "$LIB.tar.xz.part00" ] || {
    echo "fa4_wheels: $STAGE/$LIB.tar.xz.part00 is missing: run 'stage' with .fa4a carried in" \
         "the call just before (a machine given back in between starts bare)"; exit 1; }
  grep -v " $LIB.tar.xz$" SHA256SUMS | sha256sum -c --quiet -
  cat "$LIB".tar.xz.part* > "$LIB.tar.xz"
  grep " $LIB.tar.xz$" SHA256SUMS | sha256sum -c --quiet -
  mkdir -p "$SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" ./*.whl
  # python's tarfile and lzma: no xz program needed there
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
    "$LIB.tar.xz" "$SITE"
  rm -f "$LIB.tar.xz"
  cd - >/dev/null
  PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}" python3 -c '
import importlib.metadata as m, time
t = time.perf_counter()
import flash_attn.cute
from flash_attn.cute import interface
print(f"flash_attn.cute imports ({time.perf_counter() - t:.1f} s):",
      ", ".join(f"{n} {m.version(n)}" for n in ("flash-attn-4", "nvidia-cutlass-dsl",
                "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "nvidia-cudnn-frontend")))
'
}

case "${1:-}" in
  fetch) fetch ;;
  stage) stage ;;
  install) install ;;
  *) echo "usage: bash common/bench/fa4_wheels.sh fetch|stage|install"; exit 2 ;;
esac
