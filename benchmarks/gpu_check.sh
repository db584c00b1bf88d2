#!/usr/bin/env bash
# Issue #7's GPU checks, sized for a lent GPU machine's 15 minutes (about 10 of them here).
#
# Here, once:   bash benchmarks/gpu_wheels.sh            (the dependencies the machine's image lacks, into .whl/)
# There, two calls on the warm machine (each well inside one call's 10 minutes, so either can be rerun):
#               run(command="bash benchmarks/gpu_check.sh run", carry=[".whl"], timeout_s=480)    # ~6 min
#               run(command="bash benchmarks/gpu_check.sh extra", carry=[".whl"], timeout_s=330)  # ~4.5 min
# Back here:    cp <files_at>/cuda-*.json benchmarks/results/ && python benchmarks/run.py --readme-only
#               and compare <files_at>/memory_cuda.json's fake_over_cuda with memory.py's CPU check.
#
# 1. run.py: every method at its reference config in fp32, fp32 channels_last and bf16 autocast +
#    channels_last (training and sampling throughput, MFU against the GPU's matmul peak,
#    torch.cuda.max_memory_allocated) (stage `run`); then torch.compile of 3DiM's X-UNet and
# 2. memory.py --real --device cuda: the fake-tensor trace of whole training steps against the CUDA caching
#    allocator's peak on the toy configs (paper-scale figures rest on that trace) (stage `extra`).
# Steps are time-boxed and independent: one that fails or runs out of time leaves the others' files.
# Files are written to $WORK (/tmp/gpu_check: it outlives a call on a warm machine, so the stages' results merge)
# and copied to $OUT, the device tool's folder, at the end of each call. SKIP_WHEELS=1 DEVICE=cpu TINY=1 runs
# the same steps on a CPU with tiny references: a check of this script, not a measurement.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
if [ "${SKIP_WHEELS:-0}" != 1 ] && [ ! -d /tmp/site/diffusers ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check.sh: installing .whl/ failed (run benchmarks/gpu_wheels.sh here and carry .whl)"; exit 1; }
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import sys, torch, lightning, diffusers, kornia, jsonargparse, genvs
print(sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} 2>&1 | tee "$WORK/env.txt"

tiny=()
[ "${TINY:-0}" = 1 ] && tiny=(--tiny --repeats 1)
# the results file run.py would name for this machine (cuda-h100-16c.json, ...), in $WORK
results="$WORK/$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import run
print(run.default_results_file(run.machine(), tiny=${TINY:-0} == 1).name)")"

stage=${1:-all}
if [ "$stage" = all ] || [ "$stage" = run ]; then
    echo "== 1. run.py (${DEVICE}): fp32, channels_last, bf16 autocast + channels_last"
    for method in threedim mvdiffusion dfm warping; do  # one call each, merged: a method cut short loses only itself
        timeout 100 python3 benchmarks/run.py --device "$DEVICE" --methods "$method" --variants fp32 fp32_cl bf16_cl \
            --repeats 5 --timeout 60 --out "$results" --merge --no-readme "${tiny[@]}" 2>&1 | tee -a "$WORK/run.log"
    done
fi
if [ "$stage" = all ] || [ "$stage" = extra ]; then
    echo "== 2. run.py (${DEVICE}): torch.compile"
    timeout 115 python3 benchmarks/run.py --device "$DEVICE" --methods threedim --variants fp32_cl_compile --merge \
        --repeats 5 --timeout 100 --out "$results" --no-readme "${tiny[@]}" 2>&1 | tee -a "$WORK/run.log"
    echo "== 3. memory.py --real --device ${DEVICE}"
    configs=(configs/3dim_toy.yaml configs/dfm_toy.yaml configs/warping_toy.yaml)
    [ "${TINY:-0}" = 1 ] && configs=(configs/dfm_toy.yaml)
    timeout 150 python3 benchmarks/memory.py --real --device "$DEVICE" "${configs[@]/#/--config=}" \
        --out "$WORK/memory_cuda.json" 2>&1 | tee "$WORK/memory.log"
fi
ls -l "$WORK"
if [ -n "${OUT:-}" ]; then cp "$WORK"/*.json "$WORK"/*.log "$WORK"/*.txt "$OUT"/ 2>/dev/null; fi
