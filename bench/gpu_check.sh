#!/usr/bin/env bash
# One-call GPU check (see bench/gpu_check.py and bench/README.md):
#   bash bench/gpu_check.sh OUT_DIR [--budget SECONDS] [--skip STEP,...] [--bench-device cuda|cpu]
#       [--step-variants a,b,...] [--step-cap S] [--losses a,b] [--tests all|sync]   (a follow-up call: a subset)
# The train step users run (bench/step_bench.py), the loss benches on the training inputs, kernel + sync
# tests with real Triton compilation, the sync probe, the peer bench, a short training run; at most 8
# files into OUT_DIR (gpu_check.json, bench_summary.md, step.json, bench.json, peer.json, sync.json,
# dispatch.json, log.txt). Installs nothing: the repo is used in place through PYTHONPATH
# (fastkd/kernels is a git-tracked symlink to kernels/). Default budget 500 s: done inside 9 minutes;
# a failing or timed-out step is recorded and the next one runs. --bench-device cpu: the CPU dry run.
set -u
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR [--budget SECONDS] [--skip STEP,...] [--bench-device cuda|cpu]" >&2
    exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$1"
shift
mkdir -p "$out" || exit 2
unset TRITON_INTERPRET
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
cd "$repo" || exit 2
"$py" "$repo/bench/gpu_check.py" "$out" "$@"
rc=$?
if [ ! -f "$out/gpu_check.json" ]; then
    # the driver itself broke: keep at least the GPU description and say so
    command -v nvidia-smi >/dev/null && nvidia-smi -q >"$out/nvidia-smi.txt" 2>&1
    echo "{\"ok\": false, \"error\": \"bench/gpu_check.py exited with $rc before writing its report\"}" \
        >"$out/gpu_check.json"
fi
exit $rc
