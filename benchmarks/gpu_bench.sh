#!/usr/bin/env bash
# The GPU benchmarks on a Qwen2.5-VL-7B-shaped model with random weights (vLLM's
# load_format=dummy). Runs where vLLM 0.26.0 is importable (on this workplace's device
# machines: after the carried bundle is unpacked and its device-env.sh sourced), from the
# repository root. Build that bundle with the worker's own needs as its extra file:
#   bash ../shared/gpu/build-bundle.sh /tmp/gpu-bundle benchmarks/gpu-requirements.txt
#
#   bash benchmarks/gpu_bench.sh OUTDIR [LABEL] [extra args...]
#       benchmarks.bench: the handler against the bare engine, 128 tokens per job;
#   MODE=agent bash benchmarks/gpu_bench.sh OUTDIR [LABEL] [extra args...]
#       benchmarks.agent_workload: the GUI-agent workload (full-size screenshots at the
#       model's own pixel limit, 32 tokens) through the worker's HTTP server against
#       `vllm serve` with the same engine arguments, both on one GPU (0.42 of it each).
#   MODE=queue bash benchmarks/gpu_bench.sh OUTDIR [LABEL] [extra args...]
#       benchmarks.queue_concurrency: MAX_CONCURRENCY 16, 32 and 64 as deployed, the worker
#       behind a RunPod-style job queue, a backlog of the agent workload's jobs per round.
#   MODE=parallel bash benchmarks/gpu_bench.sh OUTDIR [LABEL] [extra args...]
#       benchmarks.parallel_gpus: one GPU, TENSOR_PARALLEL_SIZE=2 and DATA_PARALLEL_SIZE=2,
#       each alone on a two-GPU machine, on the agent workload (--configs one,tp2,dp2).
#
# Writes OUTDIR/<date>-<LABEL>.json (and .png or .md) and OUTDIR/bench.log.
set -euo pipefail
OUTDIR=${1:?usage: gpu_bench.sh OUTDIR [LABEL] [args...]}; LABEL=${2:-gpu}; shift $(( $# > 1 ? 2 : 1 ))
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MODEL=${SHAPED_MODEL_DIR:-/tmp/q7b}
[ -f "$MODEL/config.json" ] || python3 -m tools.shaped_model "$MODEL"
export MODEL_NAME="$MODEL" LOAD_FORMAT=dummy HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
if [ "${MODE:-bench}" = parallel ]; then
  # Each configuration alone on the machine: the whole of each GPU it uses.
  export GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.9} MAX_MODEL_LEN=${MAX_MODEL_LEN:-16384}
  python3 -m benchmarks.parallel_gpus --out "$OUTDIR" --label "$LABEL" "$@" 2>&1 | tee "$OUTDIR/bench.log"
  exit "${PIPESTATUS[0]}"
fi
if [ "${MODE:-bench}" = queue ]; then
  # The worker alone on the GPU, as deployed.
  export GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.9} MAX_MODEL_LEN=${MAX_MODEL_LEN:-16384}
  python3 -m benchmarks.queue_concurrency --out "$OUTDIR" --label "$LABEL" "$@" 2>&1 | tee "$OUTDIR/bench.log"
  exit "${PIPESTATUS[0]}"
fi
if [ "${MODE:-bench}" = agent ]; then
  # vLLM's own scheduler defaults (the worker starts in `vllm serve`'s usage context);
  # room for a 4K screenshot at the model's own limit (~10,600 tokens).
  export GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.42} MAX_MODEL_LEN=${MAX_MODEL_LEN:-16384}
  export PATH="$PATH:${PYSPY_DIR:-/tmp/site/bin}"
  python3 -m benchmarks.agent_workload --out "$OUTDIR" --label "$LABEL" "$@" 2>&1 | tee "$OUTDIR/bench.log"
  exit "${PIPESTATUS[0]}"
fi
export GPU_MEMORY_UTILIZATION=0.5 MAX_MODEL_LEN=8192 MAX_NUM_SEQS=64 IMAGE_MAX_PIXELS=1003520
python3 -m benchmarks.bench --out "$OUTDIR" --label "$LABEL" --max-tokens 128 --reps 4 \
    --trace-preprocess --e2e-reps 8 --gap-reps 8 "$@" 2>&1 | tee "$OUTDIR/bench.log"
