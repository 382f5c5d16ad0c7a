#!/usr/bin/env bash
# Everything this project checks on a GPU, in one run of under 8 minutes on one H100/H200;
# every result lands under $OUT (default runs/gpu_suite):
#   pytest.log, junit.xml   tests/gpu (one-GPU training, bf16 vs the fp32 CPU reference,
#                           resume, the torch FP8 backend, TE recipes where TE imports)
#   smoke_1gpu/             configs/smoke_1gpu.yaml's run: metrics.jsonl, plots/loss.png
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
WHEELS="deepspeed==0.19.8 megatron-core==0.16.1 safetensors pyyaml"

if [[ ${1:-} == --prepare-wheels ]]; then
    mkdir -p .whl
    # deepspeed ships as an sdist: build its pure-Python wheel here (ops compile on first use).
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 || exit 1
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        megatron-core==0.16.1 safetensors pyyaml hjson ninja py-cpuinfo msgpack || exit 1
    ls -la .whl
    exit 0
fi

if [[ -d .whl ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
case $? in
    0) ;;
    3) echo "gpu_suite: no CUDA device here: skipped (nothing run, nothing written)"; exit 0 ;;
    *) echo "gpu_suite: $PY cannot import torch" >&2; exit 1 ;;
esac
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    echo "wheels wanted: $WHEELS"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
rc=0
start=$(date +%s)

echo "== tests/gpu"
timeout 300 "$PY" -m pytest -q -m gpu tests/gpu --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
[[ $test_rc == 0 ]] || rc=1

echo "== configs/smoke_1gpu.yaml (loss curve)"
rm -rf "$OUT/smoke_1gpu"
timeout 150 "$PY" launchers/train.py --config configs/smoke_1gpu.yaml train.out_dir="$OUT/smoke_1gpu" \
    train.save_every=0 2>&1 | tail -n 20 || rc=1

echo "== throughput and MFU"
timeout 200 "$PY" benchmarks/gpu_throughput.py --out "$OUT/throughput" 2>&1 | tee "$OUT/throughput.log" || rc=1
cp "$OUT/throughput/throughput.json" "$OUT/" 2>/dev/null

echo "gpu_suite finished in $(($(date +%s) - start)) s with exit code $rc (tests: $test_rc)"
exit $rc
