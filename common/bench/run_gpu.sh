#!/usr/bin/env bash
# Run packages' GPU benchmark scripts one after another on the device machine (no nox there):
#   bash common/bench/run_gpu.sh hamilton ring_swa ...      (each capped at $CAP seconds)
# Besides packages: repro:<pkg> (python -m longattn.common.repro), cudnn, cudnn_varlen,
# cudnn_ragged, staging, decode_batch, tree_check, strategies, packed, gpu_world, fa4,
# peer_ring, peer_torchscale, profile, tune_hyper (the scripts named in the case below);
# ARGS_<name> adds arguments (ARGS_hyper=--no-sweep; profile takes its configurations there,
# default "hyper-causal-bwd dilated swa").
# peer_ring / peer_torchscale run the published peers that common/bench/fetch_peers.sh put
# into the git-ignored .peers/ (carry it); their folder goes on PYTHONPATH for those two.
# fa4 runs common/bench/check_fa4.py on the FlashAttention-4 stack that
# common/bench/fa4_wheels.sh install put into /tmp/site (see there; CAP=570 gives it time);
# while that stack is there every case has it on its path, so e.g.
# ARGS_dilated="--no-flex --backends auto,fa4" times fa4 beside cuDNN in the package's run.
# Logs and results go to bench_out/<pkg>/; on the device machine they come back packed as
# $OUT/results.tgz (the device tool returns at most 8 files).
set -u
cd "$(dirname "$0")/../.."
# optional wheels carried to the device (e.g. nvidia-cudnn-frontend for the "cudnn" backend)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$(ls -d */src | tr '\n' ':')${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
base="bench_out"
cap="${CAP:-240}"
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv,noheader || true
# repro:<pkg> runs that paper's reproduction on $TARGET (default: H200-1 on an H200, H100-1 on
# an H100), one of <pkg>/targets/; repro:hyper times its sweep and needs CAP=200 or more (180.5 s
# on an H100, docs/results/gpu/repro_hyper_H100-1_log.txt), the others under 30 s each
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
case "$gpu" in *H200*) target="${TARGET:-H200-1}" ;; *) target="${TARGET:-H100-1}" ;; esac
for pkg in "$@"; do
  if [ "${pkg%%:*}" = repro ]; then
    name="repro_${pkg#repro:}"
    mkdir -p "$base/$name"
    echo "=== $name (target $target) $(date -u +%H:%M:%S)"
    start=$(date +%s)
    timeout "$cap" python -m longattn.common.repro "${pkg#repro:}" --target "$target" \
      --out "$base/$name" 2>&1 | grep -v -E "Warning|warn\(" | tee "$base/$name/log.txt" \
      | tail -n 30
    echo "=== $name exit ${PIPESTATUS[0]} ($(( $(date +%s) - start )) s)"
    continue
  fi
  case "$pkg" in  # a package's main benchmark, or one of the named probes and benchmarks
    common) script=common/bench/bench_kernels.py ;;
    cudnn) script=common/bench/check_cudnn.py ;;
    cudnn_varlen) script=common/bench/check_cudnn_varlen.py ;;
    cudnn_ragged) script=common/bench/check_cudnn_ragged.py ;;
    staging) script=common/bench/check_staging.py ;;
    decode_batch) script=tree/bench/bench_decode_batch.py ;;
    tree_check) script=tree/bench/check_gpu.py ;;
    strategies) script=hamilton/bench/bench_strategies.py ;;
    packed) script=hamilton/bench/bench_packed.py ;;
    gpu_world) script=integrations/bench/gpu_world.py ;;
    fa4) script=common/bench/check_fa4.py ;;
    peer_ring) script=hamilton/bench/bench_peer_ring.py ;;
    peer_torchscale) script=dilated/bench/bench_peer_torchscale.py ;;
    profile) script=common/bench/profile_kernels.py ;;
    tune_hyper) script=hyper/bench/tune_hyper.py ;;
    *) script="$pkg/bench/bench_$pkg.py" ;;
  esac
  extra="ARGS_$pkg"
  pypath="$PYTHONPATH"
  # fa4_wheels.sh install's --target folder (for every case, so the packages' benchmarks can
  # name backend fa4): its CuTe-DSL folder comes from a .pth file, which PYTHONPATH does not
  # read, so it is named as well
  if [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ]; then
    pypath="/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$pypath"
  fi
  case "$pkg" in peer_*) pypath="$PWD/.peers:$pypath" ;; esac
  if [ "$pkg" = profile ] && [ -z "${ARGS_profile:-}" ]; then
    ARGS_profile="hyper-causal-bwd dilated swa"
  fi
  mkdir -p "$base/$pkg"
  echo "=== $pkg ($script) $(date -u +%H:%M:%S)"
  PYTHONPATH="$pypath" timeout "$cap" python "$script" --out "$base/$pkg" ${!extra:-} 2>&1 \
    | grep -v -E "Warning|warn\(" | tee "$base/$pkg/log.txt" | tail -n 60
  echo "=== $pkg exit ${PIPESTATUS[0]}"
done
if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" "$base" && echo "packed $OUT/results.tgz"; fi
