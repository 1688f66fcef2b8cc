#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a session lent one (about 15 minutes of device time in all, its
# start included, so this must leave room for one rerun: it is sized to finish in under 6 minutes on one H200).
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # default: $OUT (the device tool's folder), else /tmp/sbsampler_gpu
#
# Writes at most 8 files into OUT_DIR (what the device tool brings back): gpu.txt (the card), test_cuda.log
# (tests/test_cuda.py: the hook, the loader, AMP scoring, selection on the GPU with the sync debug mode, the
# look-ahead on a side stream, fully_shard scoring), step_time_gpu.json (benchmarks/step_time.py, look-ahead rows included) and, where
# FFCV imports (it is not on the lent machine's image: carry it, or the FFCV steps are skipped and say so),
# imagenet_smoke.log (the ImageNet example's smoke test, and its DDP path under torchrun on NCCL) and imagenet_throughput_gpu.{json,png}; each step's log.
# Runs from the repository root with the machine's own torch (no install: sbsampler is put on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/sbsampler_gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SBSAMPLER_RESULTS_DIR="$out" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
status=0
run() {  # run NAME SECONDS COMMAND...: its output to OUT_DIR/NAME, its failure remembered
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s): $*"
  timeout "$limit" "$@" >"$out/$name" 2>&1 || { echo "   failed ($?): see $name"; status=1; }
  tail -n 3 "$out/$name"
}
{ nvidia-smi -L; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } \
  >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
run test_cuda.log 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
if "$PY" -c "import ffcv" 2>/dev/null; then
  run imagenet_smoke.log 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_examples.py \
    -k "imagenet_example_smoke or ddp_path_on_one_gpu"
  run imagenet_throughput.log 150 "$PY" benchmarks/imagenet_throughput.py
else
  echo "== FFCV does not import here: the ImageNet smoke test and imagenet_throughput.py are skipped" | tee "$out/ffcv_skipped.txt"
fi
run step_time.log 150 "$PY" benchmarks/step_time.py
exit $status
