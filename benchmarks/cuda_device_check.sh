#!/usr/bin/env bash
# CUDA proof on a GPU machine, in one command.
#
#   bash benchmarks/cuda_device_check.sh            # here: pack TVM (cp312) + build the zoo artifacts into .carry/
#   bash benchmarks/cuda_device_check.sh --device   # on the GPU machine (Python 3.12, torch, numpy, nvcc; no TVM)
#
# The first form prints the exact device command; it needs .carry/ carried along (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.carry
SITE=$CARRY/tvm_site.tar.xz
ARCH=${ARCH:-sm_90a}

if [[ "${1:-}" == "--device" ]]; then
    mkdir -p /tmp/site && tar xJf "$SITE" -C /tmp/site
    export PYTHONPATH=/tmp/site TVM_CUDA_COMPILE_MODE=nvcc
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    python3 benchmarks/cuda_sparse.py check "$CARRY/cuda_zoo"
    python3 benchmarks/cuda_sparse.py bench ${QUICK:+--quick}
    exit 0
fi

PY=${PYTHON:-/work/venv/bin/python}
if [[ ! -f "$SITE" ]]; then
    tmp=$(mktemp -d)
    tvm_version=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm'))")
    ffi_version=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
    "$PY" -m pip download -q --python-version 3.12 --only-binary=:all: --no-deps -d "$tmp/wheels" \
        "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version"
    mkdir -p "$tmp/site" "$CARRY"
    for w in "$tmp"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$tmp/site"; done
    rm -rf "$tmp/site/tvm/3rdparty" "$tmp/site/tvm/src" "$tmp/site/tvm/web" "$tmp/site/tvm/include"
    tar cf - -C "$tmp/site" . | xz -9 -T0 > "$SITE.part" && mv "$SITE.part" "$SITE"
    rm -rf "$tmp"
fi
rm -rf "$CARRY/cuda_zoo"
"$PY" benchmarks/cuda_sparse.py prepare "$CARRY/cuda_zoo" --arch "$ARCH"
du -sb "$CARRY"  # the device carry limit is 64 MiB (67108864 bytes)
echo "device command: bash benchmarks/cuda_device_check.sh --device   (carry: [\"$CARRY\"], timeout_s: 540)"
