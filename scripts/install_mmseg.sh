#!/usr/bin/env bash
# Install the optional mmsegmentation integration (diffperc.integrations.mmseg) into the
# active Python environment.
#
#   source .venv/bin/activate && bash scripts/install_mmseg.sh
#
# mmsegmentation 1.2.2 needs full mmcv (with its compiled ops, `mmcv._ext`) in [2.0.0rc4, 2.2.0):
# mmcv 2.2.0 is rejected at import and mmcv-lite has no ops. mmcv 2.1.0 has no wheel for recent
# torch on PyPI, so it is built here from the sdist: setuptools<80, no build isolation (its
# setup.py imports torch), and -std=c++17 patched to -std=c++20 (torch >= 2.14 headers need
# C++20). On a 2-core CPU machine the build takes 8-16 minutes.
#
# Environment (all optional):
#   PYTHON      interpreter whose environment receives the packages (default: python)
#   MAX_JOBS    parallel compile jobs (default 2)
#   FORCE_CUDA  1 to build the CUDA ops too (needs nvcc and CUDA_HOME; default 0 = CPU ops only)
#   MMCV_WORK   folder for the sdist and build (default: a temporary folder, removed afterwards)
set -euo pipefail

PYTHON="${PYTHON:-python}"
MMCV_VERSION="2.1.0"
MMSEG_VERSION="1.2.2"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "error: '$PYTHON' cannot import torch; activate the diffperc environment first" \
         "(e.g. 'source .venv/bin/activate') or set PYTHON=/path/to/python" >&2
    exit 1
fi
echo "Installing into: $("$PYTHON" -c 'import sys; print(sys.prefix)')"

pip() { "$PYTHON" -m pip "$@"; }

# 1. Build requirements and mmcv's pure-Python dependencies (mmcv itself is built with --no-deps).
pip install "setuptools<80" wheel ninja "mmengine>=0.10" addict "opencv-python-headless" pyyaml yapf ftfy regex

# 2. mmcv from the sdist, patched for C++20.
if [[ -n "${MMCV_WORK:-}" ]]; then
    work="$MMCV_WORK"
    mkdir -p "$work"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi
if "$PYTHON" -c "import mmcv, mmcv._ext, sys; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" 2>/dev/null; then
    echo "mmcv $MMCV_VERSION with compiled ops is already installed; skipping the build"
else
    pip download --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
    tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
    src="$work/mmcv-$MMCV_VERSION"
    if ! grep -q -- "-std=c++17" "$src/setup.py"; then
        echo "error: $src/setup.py has no '-std=c++17' flag to patch; the sdist layout changed" >&2
        exit 1
    fi
    sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
    start=$(date +%s)
    MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}" \
        pip install --no-build-isolation --no-deps -v "$src"
    echo "mmcv build took $(( $(date +%s) - start )) s"
fi

# 3. mmsegmentation itself (its install requirements do not include mmcv).
pip install "mmsegmentation==$MMSEG_VERSION"

# 4. Check: importing mmseg.models needs mmcv._ext; the integration registers DiffPercBackbone.
"$PYTHON" - <<'EOF'
import mmcv
import mmseg
import mmseg.models  # noqa: F401  (fails without mmcv's compiled ops)
from mmseg.registry import MODELS

import diffperc.integrations.mmseg  # noqa: F401

assert MODELS.get("DiffPercBackbone") is not None, "DiffPercBackbone is not registered"
print(f"OK: mmcv {mmcv.__version__}, mmseg {mmseg.__version__}, DiffPercBackbone registered")
EOF
