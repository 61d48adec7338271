#!/usr/bin/env bash
# session 7, call 2: CUDA tests, decode A/B (torch / window kernel / fused), offload at 32K and 128K
set -u
export PYTHONPATH=$PWD/.whl/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
P="locret:budget=16384,chunk=2048"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_window_kernel.py tests/test_fused.py tests/test_cuda.py tests/test_decode.py -rs -x 2>&1 | tee $OUT/pytest.log | tail -8
timeout 200 python3 scripts/probe_decode.py --context 32768 --policies "full $P" 2>&1 | grep -v -i warn > $OUT/ab32k.log; grep "==\|\[\|kernels,\|floor\|Error\|error" $OUT/ab32k.log
timeout 100 python3 main.py bench gpu128k --context 32768 --decode 8 --policies offload --out $OUT/off32k 2>&1 | grep -v ETA | tail -6
timeout 200 python3 main.py bench gpu128k --decode 4 --policies offload --out $OUT/off128k 2>&1 | grep -v ETA | tail -6
