#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a session lent one (about 15 minutes of device time in all, its
# start included, so this must leave room for one rerun: each step has a time limit, 9 minutes at the very most
# together, and on one H200 it should take well under 6).
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # default: $OUT (the device tool's folder), else /tmp/sbsampler_gpu
#
# Writes at most 6 files into OUT_DIR (the device tool brings back 8): gpu_check.log (the card, then each step's
# output: tests/test_cuda.py, which covers the hook, the loader, AMP scoring, selection on the GPU under the sync
# debug mode, the look-ahead on a side stream and fully_shard scoring; the ImageNet example's smoke test and its
# DDP path under torchrun on NCCL; the benchmarks' tables), step_time_gpu.json (look-ahead rows included),
# cheap_scoring_gpu.json (the scoring forward under AMP, channels-last, compile and a CUDA graph) and, where FFCV
# imports (it is not on the lent machine's image: carry it, or those steps are skipped and the log says so),
# imagenet_throughput_gpu.{json,png}.
# Runs from the repository root with the machine's own torch (no install: sbsampler is put on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/sbsampler_gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SBSAMPLER_RESULTS_DIR="$out" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
log="$out/gpu_check.log"
status=0
run() {  # run TITLE SECONDS COMMAND...: its output appended to the log, its failure remembered
  local title=$1 limit=$2
  shift 2
  echo "== $title (at most ${limit} s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1 || { echo "   FAILED ($?)" | tee -a "$log"; status=1; }
  echo "   $((SECONDS - t0)) s" | tee -a "$log"
}
{ nvidia-smi -L; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } >"$log" 2>&1
cat "$log"
run "CUDA tests" 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
if "$PY" -c "import ffcv" 2>/dev/null; then
  run "ImageNet example: smoke test, DDP path on one GPU" 90 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_examples.py -k "imagenet_example_smoke or ddp_path_on_one_gpu"
  run "imagenet_throughput.py" 150 "$PY" benchmarks/imagenet_throughput.py
else
  echo "== FFCV does not import here: the ImageNet smoke test and imagenet_throughput.py are skipped" | tee -a "$log"
fi
run "step_time.py" 120 "$PY" benchmarks/step_time.py
run "cheap_scoring.py" 60 "$PY" benchmarks/cheap_scoring.py
exit $status
