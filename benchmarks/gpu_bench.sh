#!/usr/bin/env bash
# The GPU benchmark as the README reports it: a Qwen2.5-VL-7B-shaped model with random
# weights (vLLM's load_format=dummy), 128 tokens per job, one engine in one process.
# Runs where vLLM 0.26.0 is importable (on this workplace's device machines: after the
# carried bundle is unpacked and its device-env.sh sourced), from the repository root.
#
#   bash benchmarks/gpu_bench.sh OUTDIR [LABEL] [extra bench args...]
#
# Writes OUTDIR/<date>-<LABEL>.json and .png, and OUTDIR/bench.log.
set -euo pipefail
OUTDIR=${1:?usage: gpu_bench.sh OUTDIR [LABEL] [bench args...]}; LABEL=${2:-gpu}; shift $(( $# > 1 ? 2 : 1 ))
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MODEL=${SHAPED_MODEL_DIR:-/tmp/q7b}
[ -f "$MODEL/config.json" ] || python3 -m tools.shaped_model "$MODEL"
export MODEL_NAME="$MODEL" LOAD_FORMAT=dummy GPU_MEMORY_UTILIZATION=0.5 MAX_MODEL_LEN=8192 \
       MAX_NUM_SEQS=64 IMAGE_MAX_PIXELS=1003520 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
python3 -m benchmarks.bench --out "$OUTDIR" --label "$LABEL" --max-tokens 128 --reps 4 \
    --trace-preprocess --e2e-reps 8 --gap-reps 8 "$@" 2>&1 | tee "$OUTDIR/bench.log"
