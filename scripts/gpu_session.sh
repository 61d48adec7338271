#!/usr/bin/env bash
# What a lent CUDA machine runs (BENCHMARKS.md, GPU section): `bash scripts/gpu_session.sh PART`,
# each part under 10 minutes. The machine's image lacks bitsandbytes and has an older
# transformers; they travel unpacked in .whl/site (git-ignored), made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
#       -d .whl bitsandbytes==0.50.2 transformers==5.23.0
#   unzip each into .whl/site; drop bitsandbytes' libs for CUDA 11/12, ROCm and XPU and
#   transformers/models/* except auto, llama, mistral, qwen2, phi3, gemma (64 MiB limit)
# (with that pruned transformers, AutoTokenizer cannot load saved tokenizers: the loader's
# CUDA test is left to an unpruned install).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
[ -d .whl/site ] && export PYTHONPATH=$PWD/.whl/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { local t=$1 name=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "ETA" | tail -40; echo "=== $name rc=${PIPESTATUS[0]}"; }
P="locret:budget=16384,chunk=2048"
case "${1:-check}" in
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, triton, bitsandbytes; print(torch.__version__, transformers.__version__, triton.__version__, bitsandbytes.__version__)"
    step 200 pytest python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kivi_kernel.py -k "cuda or kernel or gpu" -rs
    step 150 kernels python3 main.py bench kernels --out "$OUT"
    step 200 g32k python3 main.py bench gpu128k --context 32768 --decode 32 --out "$OUT/g32k" ;;
  graphs)
    step 200 pytest python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_decode.py -rs -x
    step 150 g32k python3 main.py bench gpu128k --context 32768 --decode 64 --policies "full $P" --out "$OUT/g32k"
    step 200 g128k python3 main.py bench gpu128k --policies "full $P" --out "$OUT" ;;
  short)  # graph decode + prefill against full at the longest length full fits, under 10 minutes
    step 75 pytest python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "graph" -rs
    step 110 g32k python3 main.py bench gpu128k --context 32768 --decode 64 --policies "full $P" --out "$OUT/g32k"
    step 100 g128k python3 main.py bench gpu128k --policies "$P" --out "$OUT"
    step 100 g128k4b python3 main.py bench gpu128k --weights 4bit --cap-gib 24 --decode 32 \
      --policies "locret:budget=4096,chunk=2048" --out "$OUT/4b" ;;
  prefill4b)
    step 280 g128k4b python3 main.py bench gpu128k --weights 4bit --cap-gib 24 --decode 32 --policies "full $P" --out "$OUT/4b" ;;
  probe)
    step 300 probe python3 main.py bench probe-attn ;;
  bf16)
    step 240 g128k python3 main.py bench gpu128k --policies "full $P $P+kivi $P+kivi+offload" --out "$OUT"
    step 330 g128koff python3 main.py bench gpu128k --policies offload --decode 4 --out "$OUT/off" ;;
  4bit)
    step 200 g128k4b12 python3 main.py bench gpu128k --weights 4bit --cap-gib 12 --decode 32 --policies "$P+kivi" --out "$OUT"
    step 300 g128k4b24 python3 main.py bench gpu128k --weights 4bit --cap-gib 24 --decode 32 --policies "$P $P+kivi+offload" --out "$OUT/24" ;;
  # the window kernel and fused norm/RoPE, A/B in one run
  decode)
    step 200 pytest python3 -m pytest -q -p no:cacheprovider tests/test_window_kernel.py tests/test_fused.py \
      tests/test_cuda.py tests/test_decode.py -rs
    step 150 ab32k python3 main.py bench probe-decode --context 32768 --policies "full $P" --profile fused ;;
  speed)
    step 200 speed python3 main.py bench speed --shape llama3-8b --lengths 4096,16384 --chunk 2048 --decode 32 \
      --baselines generate --policies "full locret:budget=2048 locret:budget=2048+kivi" --out "$OUT/speed"
    step 180 kivi python3 main.py bench gpu128k --decode 32 --policies "$P+kivi $P+kivi:fit=minmax" --out "$OUT/kivi" ;;
  final)
    step 90 g32k python3 main.py bench gpu128k --context 32768 --decode 64 --policies "full $P" --out "$OUT/g32k"
    step 260 g128k python3 main.py bench gpu128k --policies "$P $P+kivi $P+kivi+offload offload" --out "$OUT"
    step 150 g128k4b python3 main.py bench gpu128k --weights 4bit --cap-gib 24 --decode 32 \
      --policies "full locret:budget=4096,chunk=2048" --out "$OUT/4b" ;;
  sources)  # issue 35: attribution and the decode cost of tracking sources on the GPU (default model)
    step 420 sources python3 main.py bench quality --parts sources --trials 1 --policies "full auto" \
      --lengths 4096,12288 --out "$OUT/sources" ;;
  million)  # issue 36: the 8B shape reading 1M tokens on a card capped at 24 GiB, the host tier as KIVI codes
    step 560 g1m python3 main.py bench gpu128k --context 1048576 --cap-gib 24 --decode 16 \
      --policies "$P+offload:terms=on,rank=off,kbits=8,vbits=4" --out "$OUT/1m" ;;
  *) echo "parts: check graphs prefill4b probe bf16 4bit decode speed final sources million"; exit 2 ;;
esac
