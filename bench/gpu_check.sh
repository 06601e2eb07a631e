#!/usr/bin/env bash
# One-call GPU check (see bench/gpu_check.py and bench/README.md):
#   bash bench/gpu_check.sh OUT_DIR [--budget SECONDS] [--skip STEP,...]
# Kernel correctness with real Triton compilation, the benchmark suite, a short training run with
# telemetry; JSON/CSV/markdown into OUT_DIR (at most 8 files). Installs nothing: the repo is used
# in place through PYTHONPATH (fastkd/kernels is a git-tracked symlink to kernels/).
# Finishes inside 9 minutes on an H100; a failing step is recorded and the next one runs.
set -u
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR [--budget SECONDS] [--skip STEP,...]" >&2
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
