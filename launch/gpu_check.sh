#!/usr/bin/env bash
# GPU validation in one call on a lent H100/H200 (no network there): install the carried wheels,
# run the GPU-marked tests and the Triton kernel tests on CUDA, then the lookup benchmark on CUDA.
# Writes logs under $OUT (or ./gpu_check_out) and prints a short summary last.
#
#   Here:  python3 -m pip download ... -d .whl torchrec==1.6.1 fbgemm-gpu-cpu==1.6.0 tensordict==0.11.0 \
#            pyvers==0.2.2 orjson importlib_metadata iopath      (results: docs/benchmarks.md)
#   There: bash launch/gpu_check.sh [tests|bench|all]   (the device tool carries .whl)
#
# Phases, each sized to fit one 10-minute device call: `tests` (GPU tests: module, Triton kernels,
# row-wise element_range, reduced precision, serving formats, and the app's one-process
# TrainPipelineSparseDist == plain loop per sharding type on CUDA: NCCL, streams, Triton) and
# `bench` (lookup, gather ceiling, DLRM_DCN inference). `all` (the default) runs both.
set -uo pipefail
PHASE="${1:-all}"
case "$PHASE" in tests|bench|all) ;; *) echo "usage: gpu_check.sh [tests|bench|all]"; exit 2;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/robe_site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/robe_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import torch, triton, torchrec, fbgemm_gpu, importlib.metadata as md
print("torch", torch.__version__, "triton", triton.__version__, "torchrec", md.version("torchrec"),
      "fbgemm", md.version("fbgemm-gpu-cpu") if "fbgemm-gpu-cpu" in {d.metadata["Name"] for d in md.distributions()} else "?",
      "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY

status=0
test_rc=- bench_rc=- gather_rc=- infer_rc=-
if [ "$PHASE" != bench ]; then
timeout "${GPU_TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_gpu_module.py tests/test_ops_triton.py tests/test_element_range_triton.py \
  tests/test_reduced_precision_triton.py tests/test_stored_triton.py tests/test_hashing.py \
  "tests/test_train_loop.py::test_one_process_pipeline_equals_plain_loop_per_sharding_type" 2>&1 | tee "$OUT/tests.log"
test_rc=${PIPESTATUS[0]}
[ "$test_rc" = 0 ] || status=1
fi
if [ "$PHASE" != tests ]; then

timeout "${GPU_BENCH_TIMEOUT:-180}" python3 -m robe_torchrec.bench.lookup --device cuda --batch 65536 \
  --shapes "${GPU_BENCH_SHAPES:-a,b,m}" --sides robe,tbe,torch --iters 10 --warmup 3 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" = 0 ] || status=1

# the gather ceiling (ROBE's access pattern without the hash) beside the Triton forward, fp32 and bf16
timeout "${GPU_GATHER_TIMEOUT:-100}" python3 -m robe_torchrec.bench.gather_limit --device cuda --batch 65536 \
  --shapes a,b,m 2>&1 | tee "$OUT/gather_limit.log"
gather_rc=${PIPESTATUS[0]}
[ "$gather_rc" = 0 ] || status=1

# tools.fbgemm_shims: CUDA kernels for the fbgemm ops the stock EBC needs (the carried fbgemm is the CPU build).
# TF32 MLPs with rows/4 tables, then bf16 autocast with the unscaled MLPerf tables stored in bf16 (52 GB).
infer_rc=0
for args in "--precision tf32" "--precision bf16 --row-scale 1 --full-dtype bfloat16"; do
  timeout "${GPU_INFER_TIMEOUT:-140}" python3 -m tools.fbgemm_shims robe_torchrec.bench.inference --device cuda --batch 65536 \
    --iters 10 $args 2>&1 | tee -a "$OUT/inference.log"
  [ "${PIPESTATUS[0]}" = 0 ] || infer_rc=1
done
[ "$infer_rc" = 0 ] || status=1
fi

echo
echo "== summary: tests rc=$test_rc, bench rc=$bench_rc, gather rc=$gather_rc, inference rc=$infer_rc =="
[ -f "$OUT/tests.log" ] && tail -n 3 "$OUT/tests.log"
[ -f "$OUT/bench.log" ] && { grep -E "^#|^\|" "$OUT/bench.log" || true; }
[ -f "$OUT/gather_limit.log" ] && { grep -E "^#|^\|" "$OUT/gather_limit.log" || true; }
[ -f "$OUT/inference.log" ] && { grep -E "^#|^\||^ROBE|^full" "$OUT/inference.log" || true; }
exit $status
