#!/usr/bin/env bash
# Builds and installs FFCV 1.0.2 from PyPI (a C extension compiled against OpenCV and
# libjpeg-turbo, found through pkg-config), without letting pip replace the pinned CPU torch.
# Needs root (or sudo) for the Debian packages. Usage: bash scripts/install_ffcv.sh
set -euo pipefail
PY=${PYTHON:-python3}
if "$PY" -c "import ffcv, yaml" 2>/dev/null; then
  echo "ffcv already installed: $("$PY" -c 'import importlib.metadata as m; print(m.version("ffcv"))')"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
# pkg-config finds opencv4 and libturbojpeg; g++ compiles the extension.
if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
  echo "install_ffcv: apt-get install pkg-config g++ libopencv-dev libturbojpeg0-dev (OpenCV and libjpeg-turbo for FFCV's C++ extension)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    pkg-config g++ libopencv-dev libturbojpeg0-dev >/dev/null
fi
# FFCV's runtime dependencies, named one by one: its own metadata asks for packages
# (torch, torchvision, cupy) that would pull CUDA wheels over the pinned CPU torch.
# pyyaml: fastargs reads the ImageNet example's --config-file .yaml with it, but does not require it.
echo "install_ffcv: FFCV's runtime dependencies, without the CUDA packages its metadata names"
"$PY" -m pip install --quiet terminaltables fastargs pyyaml assertpy tqdm psutil pillow opencv-python-headless
"$PY" -m pip install --quiet --no-deps pytorch_pfn_extras
# --no-build-isolation: build against the numpy already installed (not a fresh one in an
# isolated env); --no-deps: see above.
echo "install_ffcv: building ffcv 1.0.2 from source (a C++ extension, 1-3 minutes)"
"$PY" -m pip install --quiet --no-build-isolation --no-deps "ffcv==1.0.2"
"$PY" -c "import importlib.metadata as m, ffcv.loader, ffcv.writer; print('ffcv', m.version('ffcv'))"
