#!/usr/bin/env bash
# Run packages' GPU benchmark scripts one after another on the device machine (no nox there):
#   bash common/bench/run_gpu.sh hamilton ring_swa ...      (each capped at $CAP seconds)
# Logs and results go to bench_out/<pkg>/; on the device machine they come back packed as
# $OUT/results.tgz (the device tool returns at most 8 files).
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$(ls -d */src | tr '\n' ':')${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
base="bench_out"
cap="${CAP:-240}"
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv,noheader || true
for pkg in "$@"; do
  script="$pkg/bench/bench_$pkg.py"
  [ "$pkg" = common ] && script=common/bench/bench_kernels.py
  mkdir -p "$base/$pkg"
  echo "=== $pkg ($script) $(date -u +%H:%M:%S)"
  timeout "$cap" python "$script" --out "$base/$pkg" 2>&1 | grep -v -E "Warning|warn\(" \
    | tee "$base/$pkg/log.txt" | tail -n 60
  echo "=== $pkg exit ${PIPESTATUS[0]}"
done
if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" "$base" && echo "packed $OUT/results.tgz"; fi
