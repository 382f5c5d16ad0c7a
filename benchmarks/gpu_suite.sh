#!/usr/bin/env bash
# Everything this project checks on a GPU, in one run of under 10 minutes on one H100/H200 (the
# parts' time limits add up to 10);
# every result lands under $OUT (default runs/gpu_suite):
#   parts.txt               each part's exit code and seconds
#   pytest.log, junit.xml   tests/gpu (one-GPU training, bf16 vs the fp32 CPU reference, recompute and
#                           torch.compile vs eager,
#                           resume, the torch FP8 backend, its cuBLAS blockwise GEMMs on Hopper vs the
#                           emulation, TE recipes where TE imports)
#   smoke_1gpu/             configs/smoke_1gpu.yaml's full run (test_smoke_1gpu_learns): metrics.jsonl,
#                           plots/loss.png, summary.json
#   generate.log            generation tokens/s vs transformers' generate() on the same weights (bf16),
#                           MTP speculative vs plain decoding on the smoke run (benchmarks/generate.py)
#   throughput.log/.json    tokens/s and MFU of configs/moe_1b_1gpu.yaml (~1.2B MoE) in bf16
#                           and FP8 (benchmarks/gpu_throughput.py states the FLOPs per token)
#   env.txt                 GPU, driver, torch, CUDA
#
#   bash benchmarks/gpu_suite.sh                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu_suite.sh --prepare-wheels # on a networked machine first, if the GPU
#                                                 # machine cannot reach PyPI: fills .whl/ with the
#                                                 # pure-Python dependencies it lacks
# A .whl/ folder, if present, is installed into /tmp/site (no network needed); torch must
# already be there with CUDA.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-runs/gpu_suite}
PY=${PYTHON:-python3}
THROUGHPUT_STEPS=${THROUGHPUT_STEPS:-30}
WHEELS="deepspeed==0.19.8 megatron-core==0.16.1 hjson pydantic typing-extensions"

if [[ ${1:-} == --prepare-wheels ]]; then
    mkdir -p .whl
    # deepspeed ships as an sdist: build its pure-Python wheel here (ops compile on first use).
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 || exit 1
    # Only what the GPU image lacks (torch, numpy, safetensors, pyyaml, einops, msgpack, ninja,
    # psutil, py-cpuinfo and tqdm are there); pydantic needs a newer typing-extensions.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl \
        megatron-core==0.16.1 hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
        typing-extensions==4.16.0 || exit 1
    ls -la .whl
    exit 0
fi

"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
case $? in
    0) ;;
    3) echo "gpu_suite: no CUDA device here: skipped (nothing run, nothing written)"; exit 0 ;;
    *) echo "gpu_suite: $PY cannot import torch" >&2; exit 1 ;;
esac
if [[ -d .whl ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    echo "wheels wanted: $WHEELS"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
rc=0
rm -f "$OUT/parts.txt"
start=$(date +%s)
# part NAME LIMIT_S CMD...: runs CMD under a time limit, its output to the terminal and to
# $OUT/NAME.log, and one line "NAME: exit CODE after S s" to $OUT/parts.txt (124: timed out).
part() {
    local name=$1 limit=$2 t0
    shift 2
    t0=$(date +%s)
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local code=${PIPESTATUS[0]}
    echo "$name: exit $code after $(($(date +%s) - t0)) s" | tee -a "$OUT/parts.txt"
    [[ $code == 0 ]] || rc=1
}

per_test=()
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 200)
rm -rf "$OUT/smoke_1gpu"
export GPU_SMOKE_OUT="$OUT/smoke_1gpu"  # test_smoke_1gpu_learns keeps its run there
part pytest 330 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider "${per_test[@]}" --junitxml="$OUT/junit.xml"
part generate 120 "$PY" benchmarks/generate.py --device cuda --dtype bf16 --smoke-run "$OUT/smoke_1gpu"
part throughput 150 "$PY" benchmarks/gpu_throughput.py --steps "$THROUGHPUT_STEPS" --out "$OUT/throughput"
cp "$OUT/throughput/throughput.json" "$OUT/" 2>/dev/null

echo "gpu_suite finished in $(($(date +%s) - start)) s with exit code $rc"
exit $rc
