#!/usr/bin/env bash
# Installs sbsampler and everything its tests, demo and benchmarks need, on a fresh machine.
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Pinned on purpose: 2.13.0 is the CPU wheel this project is tested with. A bare `torch`
# (or a range a newer release satisfies) pulls several GB of CUDA packages.
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[demo,test,bench,docs]"
# FFCV (the .beton pipeline): Debian packages + a source build; skip with SBSAMPLER_NO_FFCV=1.
if [ "${SBSAMPLER_NO_FFCV:-0}" != 1 ]; then
  bash scripts/install_ffcv.sh
fi
"$PY" -c "import sbsampler, torch, numba; print('sbsampler', sbsampler.__version__, '| torch', torch.__version__, '| numba', numba.__version__)"
