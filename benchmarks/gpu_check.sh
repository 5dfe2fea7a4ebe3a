#!/usr/bin/env bash
# Everything that needs a GPU, in ONE call on a lent machine: the CUDA tests, the offline compile
# report, and the CUDA benchmarks (CPU rows are measured on the CPU machine, not here).
#
#   bash benchmarks/gpu_check.sh --fetch     # here, once: wheels the device image lacks, into .whl/
#   device run: command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560
#
# Seven files land in $OUT (the device tool brings back at most 8): log.txt (everything printed),
# rows.txt (one line per finished benchmark), bench_kernels.json, bench_train_step.json,
# bench_compile.json and bench_sdxl.json (draw them here: python benchmarks/report.py FILE --png
# FILE.png), sdxl_step.json (the full-size SDXL UNet step per guide, benchmarks/sdxl_gpu_step.py).
# Under 560 s: the SD v1.5 benchmarks get what the tests leave less the SDXL part's
# ${SAT_GPU_SDXL_S:-190} s (0 skips it), in order (the compiled UNet last: it only uses time the
# others leave), and whatever finished is kept.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch" ]; then  # the device image has torch, triton, transformers, peft, accelerate, pytest-benchmark
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 importlib_metadata flash-colreduce==0.2.2
  ls .whl
  exit
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "run with --fetch here first and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"
python3 -c "import torch, triton, diffusers, flash_colreduce as f; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'flash_colreduce', f.__version__)" 2>&1 | tee -a "$OUT/log.txt"

timeout 150 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs 2>&1 | tee -a "$OUT/log.txt"
timeout 120 python3 benchmarks/compile_report.py --arch 90 --jobs 16 2>&1 | tee -a "$OUT/log.txt"

# -k: the CUDA parametrizations and the CUDA-only bandwidth rows. Kernels first (a minute or two),
# then the full-size SD v1.5 step, then its inductor-compiled step (minutes of compiling per guide);
# rows.txt keeps every finished row even if a limit cuts a run off.
export SAT_BENCH_ROWS="$OUT/rows.txt"
sdxl_s=${SAT_GPU_SDXL_S:-190}  # kept for the SDXL part below
for part in kernels train_step compile; do
  left=$((545 - sdxl_s - (SECONDS - start)))
  echo "benchmarks ($part): ${left}s left" | tee -a "$OUT/log.txt"
  [ "$left" -gt 20 ] || break
  timeout "$left" python3 -m pytest "benchmarks/test_bench_$part.py" --benchmark-only -q -p no:cacheprovider \
    -k "cuda or bandwidth" --benchmark-json "$OUT/bench_$part.json" 2>&1 | tee -a "$OUT/log.txt"
done

# SDXL (issue 15): its attention statistics at SDXL's shapes (~1 min with Triton's compiles), then the
# full-size SDXL UNet step at 1024 px per guide, fp16/bf16, B=1-2, as far as the time left allows
if [ "$sdxl_s" -gt 0 ]; then
  left=$((545 - (SECONDS - start)))
  echo "sdxl: ${left}s left" | tee -a "$OUT/log.txt"
  [ "$left" -gt 20 ] && timeout $((left < 75 ? left : 75)) python3 -m pytest benchmarks/test_bench_sdxl.py --benchmark-only -q \
    -p no:cacheprovider -k cuda --benchmark-json "$OUT/bench_sdxl.json" 2>&1 | tee -a "$OUT/log.txt"
  left=$((545 - (SECONDS - start)))
  [ "$left" -gt 40 ] && timeout "$left" python3 benchmarks/sdxl_gpu_step.py --budget_s $((left - 20)) \
    --rows "$OUT/rows.txt" --json "$OUT/sdxl_step.json" 2>&1 | tee -a "$OUT/log.txt"
fi
echo "done in $((SECONDS - start))s" | tee -a "$OUT/log.txt"
