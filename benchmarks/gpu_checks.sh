#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one run: the cuda tests, the kernels' benchmark, the GPU save
# benchmark at 1B (with the peft recipe beside it; 8B in a run of its own, below). Each step has its
# own time limit, so a slow step cannot starve the ones before it of their output; logs and JSON go
# to $OUT (or ./gpu-results).
#
#     bash benchmarks/gpu_checks.sh             # on a machine with a CUDA GPU, from the repository root
#
# fastsave runs from this checkout (PYTHONPATH; the Triton kernels are fastsave/kernels/). Sizes and
# their limits can be overridden: GPU_SIZES="1b:150" is the default; 8B alone, after the others:
# TESTS_SECONDS=0 KERNELS_SECONDS=0 GPU_SIZES="8b:560" (a limit of 0 skips a step). TOTAL_SECONDS
# caps the whole run: a step's limit is cut to what is left of it (a device lease is counted in
# seconds, and the last step is the one that gets cut).
#
# On one H200 (16 CPU cores, 2026-12-04): tests 31 s, kernels 17 s, 1b 61 s. 8B needs a run of its
# own: writing and loading its random 16 GB checkpoint took about five minutes there, and 400 s
# ended inside the peft recipe's save_pretrained (fastsave's save itself took 19.8 s). On one H100
# (2026-12-05, commit 04807b8, TOTAL_SECONDS=560 with 8b last) the machine stopped answering after
# about 9 minutes and nothing came back.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

# the work directory on whichever of /tmp and this checkout's disk has more room (8B: ~48 GB at the peak)
work=/tmp/fastsave-gpu
if [ "$(df --output=avail -B1 . | tail -1)" -gt "$(df --output=avail -B1 /tmp | tail -1)" ]; then
    work="$PWD/.gpu-work"
fi
{
    date -u
    nvidia-smi
    df -h /tmp . ; free -g; nproc
    "$python" -c 'import torch, transformers, peft, bitsandbytes, triton, safetensors; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__, "triton", triton.__version__, "safetensors", safetensors.__version__)'
    echo "work directory: $work"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

total=${TOTAL_SECONDS:-0}
step() {  # step NAME SECONDS COMMAND...: run with a limit, output to the console and $out/NAME.txt
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -le 0 ]; then  # a limit of 0 skips the step (timeout 0 would mean no limit at all)
        echo "=== $name: skipped (limit 0) ==="
        return
    fi
    if [ "$total" -gt 0 ]; then
        local left=$((total - SECONDS))
        if [ "$left" -lt 20 ]; then
            echo "=== $name: skipped, ${left}s left of TOTAL_SECONDS=$total ==="
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "=== $name (limit ${limit}s) ==="
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local status=$?
    tail -n 60 "$out/$name.txt"
    echo "=== $name: exit $status after $((SECONDS - started)) s ==="
}

step tests "${TESTS_SECONDS:-240}" "$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
step kernels "${KERNELS_SECONDS:-150}" "$python" benchmarks/kernel_speed.py
for entry in ${GPU_SIZES:-1b:150}; do
    size=${entry%%:*}
    step "save_$size" "${entry##*:}" "$python" benchmarks/save_gpu.py --size "$size" --peft \
        --work "$work/$size" --json "$out/save_$size.json"
    rm -rf "$work/$size"
done
