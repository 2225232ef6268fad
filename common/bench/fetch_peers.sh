#!/usr/bin/env bash
# Fetch the published peers that hamilton/bench/bench_peer_ring.py and
# dilated/bench/bench_peer_torchscale.py run beside longattn, into .peers/ (git-ignored: peer
# code never enters the repository). Run it on a machine with the package index and GitHub;
# the GPU machine, which has neither, gets .peers/ as a carried path:
#
#   bash common/bench/fetch_peers.sh
#   PYTHONPATH=.peers:$(ls -d */src | tr '\n' ':') python hamilton/bench/bench_peer_ring.py ...
#
# What lands in .peers/:
#   ring_flash_attn/ (+ dist-info)  ring-flash-attention, the wheel ring-flash-attn==$RFA_VERSION
#   torchscale/                     torchscale's package at commit $TORCHSCALE_REF: LongNet's
#                                   DilatedAttention is on GitHub only (not in the index's 0.3.0)
#   einops/ (+ dist-info)           torchscale's one import beyond torch and numpy
#   SOURCES.txt                     versions, commit and where each came from
# Neither peer brings flash-attn: the benchmarks give them common/bench/flash_shim.py instead.
#
# TORCHSCALE_GIT: a git directory of microsoft/torchscale holding TORCHSCALE_REF (a clone or a
# bare mirror); without it the commit is fetched from GitHub.
set -euo pipefail
cd "$(dirname "$0")/../.."
RFA_VERSION="${RFA_VERSION:-0.1.8}"
EINOPS_VERSION="${EINOPS_VERSION:-0.8.1}"
TORCHSCALE_REF="${TORCHSCALE_REF:-4d1e0e82e5adf86dd424f1463192635b73fc8efc}"
PY="${PYTHON:-python3}"
dest=.peers

exclude="$(git rev-parse --git-path info/exclude)"
grep -qxF '/.peers/' "$exclude" 2>/dev/null || echo '/.peers/' >>"$exclude"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$dest"
mkdir -p "$dest"

"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp/whl" \
  "ring-flash-attn==$RFA_VERSION" "einops==$EINOPS_VERSION"
for whl in "$tmp"/whl/*.whl; do
  "$PY" -m zipfile -e "$whl" "$dest"
done

if [ -n "${TORCHSCALE_GIT:-}" ]; then
  git -C "$TORCHSCALE_GIT" archive --format=tar "$TORCHSCALE_REF" torchscale | tar -x -C "$dest"
  ts_from="$TORCHSCALE_GIT"
else
  git init -q "$tmp/ts"
  git -C "$tmp/ts" fetch -q --depth 1 https://github.com/microsoft/torchscale "$TORCHSCALE_REF"
  git -C "$tmp/ts" archive --format=tar FETCH_HEAD torchscale | tar -x -C "$dest"
  ts_from=https://github.com/microsoft/torchscale
fi
git -C "${TORCHSCALE_GIT:-$tmp/ts}" show -s --format='%H %cI' "${TORCHSCALE_REF}" \
  >"$tmp/ts_commit" 2>/dev/null || echo "$TORCHSCALE_REF" >"$tmp/ts_commit"

{
  echo "ring-flash-attn $RFA_VERSION (wheel from the package index)"
  echo "einops $EINOPS_VERSION (wheel from the package index)"
  echo "torchscale $(cat "$tmp/ts_commit") (git archive of torchscale/ from $ts_from)"
  echo "fetched $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$dest/SOURCES.txt"

cat "$dest/SOURCES.txt"
du -sh "$dest"
du -sh "$dest"/*/ | sort -k2
echo "files: $(find "$dest" -type f | wc -l)"
