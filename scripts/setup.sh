#!/usr/bin/env bash
# Installs sbsampler and everything its tests, demo, benchmarks and docs need, on a fresh machine,
# saying what it does at each step.
# Usage: bash scripts/setup.sh
#   SBSAMPLER_NO_FFCV=1     skip FFCV (Debian packages + a C++ build, about 3 minutes); its tests then skip
#   SBSAMPLER_NO_BROWSER=1  skip Debian's Chromium (the docs' browser check then skips)
# Only the loop, in 30 seconds:  pip install torch==2.13.0 && pip install -e .
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$SECONDS
step() { printf '\n[setup %3ds] %s\n' "$((SECONDS - START))" "$*"; }
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
# pip's own output is hundreds of lines: kept in a log, shown in full when it fails, else its summary line
pip_install() {
  local log; log=$(mktemp)
  if ! "$PY" -m pip install --progress-bar off "$@" >"$log" 2>&1; then
    cat "$log"; echo "setup: pip install $* failed (its output is above)" >&2; exit 1
  fi
  grep -E "^Successfully installed" "$log" | cut -c1-400 || echo "(already installed)"
  rm -f "$log"
}

step "1/4 PyTorch 2.13.0, the CPU wheel (about 200 MB). Pinned on purpose: a bare \`torch\` pulls several GB of CUDA packages."
pip_install "torch==2.13.0"

step "2/4 sbsampler (editable) with the extras for the demo, tests, benchmarks and docs: numba, scikit-learn, lightning, transformers, accelerate, mkdocs, playwright ..."
pip_install -e ".[demo,test,bench,docs]"

if [ "${SBSAMPLER_NO_FFCV:-0}" != 1 ]; then
  step "3/4 FFCV 1.0.2 (the .beton pipeline): a C++ extension built against OpenCV and libjpeg-turbo, so it needs Debian packages (apt-get${SUDO:+ through sudo}: pkg-config g++ libopencv-dev libturbojpeg0-dev) and a source build, about 3 minutes. Skip it with SBSAMPLER_NO_FFCV=1."
  bash scripts/install_ffcv.sh
else
  step "3/4 FFCV skipped (SBSAMPLER_NO_FFCV=1): sbsampler.ffcv and its tests are off."
fi

if [ "${SBSAMPLER_NO_BROWSER:-0}" != 1 ]; then
  if command -v chromium >/dev/null 2>&1; then
    step "4/4 Chromium for the docs' browser check: $(command -v chromium) is there."
  else
    step "4/4 Chromium for the docs' browser check (scripts/docs_check.py): Debian's package, apt-get${SUDO:+ through sudo}. Skip it with SBSAMPLER_NO_BROWSER=1."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
else
  step "4/4 Chromium skipped (SBSAMPLER_NO_BROWSER=1): the docs' browser check will skip."
fi

step "done:"
"$PY" -c "import sbsampler, torch, numba; print('sbsampler', sbsampler.__version__, '| torch', torch.__version__, '| numba', numba.__version__)"
