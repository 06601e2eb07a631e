#!/usr/bin/env bash
# The kernel proofs on the GPU machines' versions, on this CPU: torch 2.11 / triton 3.6 / timm 1.0.29
# (bench/results/*/README.md). CI and the README pin torch 2.14.1 / triton 3.8, so nothing else shows that a
# kernel still builds (sm_80, sm_90a: no spills, every tl.dot on mma/wgmma) and computes right (the
# interpreter against the fp64 references) under the Triton the next GPU session will run.
#
#   bash tests/kernels/versions_check.sh [VENV_DIR] [--full] [--keep]
#
# VENV_DIR (default: a temporary folder) gets a ~5 GB environment, removed at the end unless --keep.
# --full also runs the whole test suite under torch 2.11. Not part of CI: the second environment would
# double CI's install time and disk.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="" full=0 keep=0
for a in "$@"; do
    case "$a" in
        --full) full=1 ;;
        --keep) keep=1 ;;
        *) venv="$a" ;;
    esac
done
if [ -z "$venv" ]; then
    venv="$(mktemp -d)/venv"
fi
if [ "$keep" = 0 ]; then
    trap 'rm -rf "$venv"' EXIT
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    # numpy < 2.4: triton 3.6's interpreter takes int() of one-element arrays, which numpy 2.4 refuses
    # ("only 0-dimensional arrays can be converted to Python scalars"); the compiled path does not care
    "$venv/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm==1.0.29 "numpy<2.4" \
        safetensors tqdm scikit-learn matplotlib nvidia-ml-py pytest pytest-benchmark pytest-xdist
fi
py="$venv/bin/python"
export PYTHONPATH="$PWD"
"$py" -c "import torch, triton, timm; print('versions:', torch.__version__, triton.__version__, timm.__version__)"
TRITON_CACHE_DIR="$(mktemp -d)" "$py" tests/kernels/compile_check.py | tail -1
TRITON_INTERPRET=1 OMP_NUM_THREADS=2 "$py" -m pytest -q -p no:cacheprovider tests/kernels tests/ops | tail -1
if [ "$full" = 1 ]; then
    "$py" -m pytest -q -p no:cacheprovider | tail -1
fi
