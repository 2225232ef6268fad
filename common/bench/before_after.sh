#!/usr/bin/env bash
# One package's GPU benchmark on two source trees in one run, on the same machine, one after the
# other: an older tree (BASE, e.g. `mkdir .base && git archive <rev> | tar -x -C .base`, carried
# to the device) and this checkout. Used to show what a change costs:
#   bash common/bench/before_after.sh .base hamilton ring_swa
# Each package's script is the one of the tree it measures (<pkg>/bench/bench_<pkg>.py, or
# SCRIPT_<pkg>=<file in <pkg>/bench/>); ARGS_<pkg> adds arguments; logs and
# JSON go to bench_out/before_after/<pkg>/{before,after}/ and come back as $OUT/before_after.tgz.
set -u
cd "$(dirname "$0")/../.."
base="$1"; shift
if ls .whl/*.whl >/dev/null 2>&1; then  # optional wheels (nvidia-cudnn-frontend for "cudnn")
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export EXTRA="/tmp/site"
fi
export PYTHONUNBUFFERED=1
out="bench_out/before_after"
cap="${CAP:-240}"
for pkg in "$@"; do
  extra="ARGS_$pkg"
  script="SCRIPT_$pkg"; script="${!script:-bench_$pkg.py}"
  for side in before after; do
    root=$([ "$side" = before ] && echo "$base" || echo .)
    dir="$out/$pkg/$side"
    mkdir -p "$dir"
    path="$(cd "$root" && ls -d "$PWD"/*/src | tr '\n' ':')${EXTRA:-}"
    echo "=== $pkg $side ($root) $(date -u +%H:%M:%S)"
    (cd "$root" && PYTHONPATH="$path" timeout "$cap" python3 "$pkg/bench/$script" \
      --out "$OLDPWD/$dir" ${!extra:-}) 2>&1 | grep -v -E "Warning|warn\(" \
      | tee "$dir/log.txt" | tail -n 14
  done
done
if [ -n "${OUT:-}" ]; then tar czf "$OUT/before_after.tgz" "$out" && echo "packed"; fi
