#!/usr/bin/env bash
# Every measurement that needs a GPU, in one run of at most 12 minutes on one H100/H200:
#   1. the Triton attention-KD tests compiled for real (not the interpreter) on the device, and the
#      device-side image path's tests on nvJPEG (tests/test_data_gpu.py with DLIP_TEST_DEVICE=cuda)
#   2. the kernel benchmark at BLIP sizes (attention KD at N = 197 / 577, the LM losses)
#   3. the distillation step benchmark (fp16 teacher, bf16 student, fused kernels on/off, MFU)
#   4. a 20-step real-size distillation in fp16 and in bf16, the loss going down
#   5. the loader: data.decode cpu vs gpu at 224 and 384 px with 8 and 16 workers (benchmarks/loader.py)
# Each writes its table into benchmarks/results/ (copy them into benchmarks/README.md with the date);
# logs go to benchmarks/results/gpu_check/. Usage, in the project root of the GPU host:
#   bash benchmarks/gpu_check.sh [--quick]      (--quick: fewer steps, for a smoke test)
set -uo pipefail
cd "$(dirname "$0")/.."
logs=benchmarks/results/gpu_check
mkdir -p "$logs"
quick=0; [[ ${1:-} == --quick ]] && quick=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
failed=()

step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, go on after a failure
  local name=$1 limit=$2; shift 2
  echo "[gpu_check $(date -u +%H:%M:%S)] $name (limit ${limit}s): $*"
  if timeout "$limit" "$@" > "$logs/$name.log" 2>&1; then
    tail -n 4 "$logs/$name.log"
  else
    echo "  FAILED (exit $?): see $logs/$name.log"; tail -n 15 "$logs/$name.log"; failed+=("$name")
  fi
}

peak=$(python3 - <<'EOF'
import torch
name = torch.cuda.get_device_name()
# dense bf16 peak TFLOP/s (SXM parts), for MFU
print(next((v for k, v in {"H200": 989, "H100": 989, "A100": 312}.items() if k in name), 0))
EOF
)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/device.txt"

step triton_tests 90 env DLIP_TEST_DEVICE=cuda TRITON_INTERPRET=0 \
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py
step data_gpu_tests 90 env DLIP_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_data_gpu.py
step kernels 120 python3 benchmarks/kernels.py --device cuda
if (( quick )); then steps=4; else steps=20; fi
step step_benchmark 120 python3 benchmarks/step.py --device cuda --steps "$steps" --peak-tflops "$peak"
step distill_check 180 python3 benchmarks/distill_check.py --device cuda --steps "$steps" \
  --configs zero2_fp16 zero2_bf16
if (( quick )); then rounds=1; else rounds=3; fi
step loader 200 python3 benchmarks/loader.py --device cuda --sides 512 --images 800 --repeats "$rounds"

if (( ${#failed[@]} )); then echo "gpu_check: failed: ${failed[*]}"; exit 1; fi
echo "gpu_check: all passed; tables in benchmarks/results/"
