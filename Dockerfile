# syntax=docker/dockerfile:1.7
# vlm-worker on the official vLLM image. Two ways to build (README, "Deploy"):
#
#   docker build -t vlm-worker .
#       the model is chosen at run time with MODEL_NAME and downloaded, on first start,
#       into the network volume's Hugging Face cache;
#   docker build -t vlm-worker:qwen7b --build-arg MODEL_NAME=Qwen/Qwen2.5-VL-7B-Instruct \
#       [--build-arg MODEL_REVISION=<commit>] [--secret id=HF_TOKEN,env=HF_TOKEN] .
#       the model is baked into the image and the worker starts offline.
#
# The base image brings Python, CUDA, torch and vLLM. The worker is tested on vLLM 0.26.0
# to 0.32.x (pyproject.toml's `gpu` extra; README "vLLM versions"): 0.26.0 is the default,
# the release its GPU numbers were measured on; `--build-arg VLLM_VERSION=v0.32.0` builds on
# the newest tested one. A release outside the range fails the build (check_vllm.py below).
ARG VLLM_VERSION=v0.26.0
FROM vllm/vllm-openai:${VLLM_VERSION}

# Every cache on the network volume (mounted at /runpod-volume when the endpoint has one):
# weights downloaded by one cold start, and Triton/vLLM/torch.compile artefacts, are
# reused by the next. HF_HUB_CACHE is where RunPod's model cache puts models too. Without
# a volume the same paths are plain folders on the container disk. These are evaluated
# at build time (--build-arg BASE_PATH=...); at run time set the variables themselves.
ARG BASE_PATH
ENV HF_HOME=${BASE_PATH:-/runpod-volume}/huggingface-cache \
    HF_HUB_CACHE=${BASE_PATH:-/runpod-volume}/huggingface-cache/hub \
    XDG_CACHE_HOME=${BASE_PATH:-/runpod-volume}/.cache \
    TRITON_CACHE_DIR=${BASE_PATH:-/runpod-volume}/.cache/triton \
    VLLM_CACHE_ROOT=${BASE_PATH:-/runpod-volume}/.cache/vllm \
    PYTHONUNBUFFERED=1

WORKDIR /app

# --- Optional model bake, before the worker's code so that a code change keeps this
# (multi-GB) layer cached. builder/bake_model.py needs only huggingface_hub, which the
# base image has. The token is a BuildKit secret: a file for this one RUN, never in a
# layer; without it public models still bake. The hub's own caches go to a scratch
# folder and are deleted, so the layer holds only /models.
COPY builder/ /app/builder/
ARG MODEL_NAME=""
ARG MODEL_REVISION=""
RUN --mount=type=secret,id=HF_TOKEN,required=false \
    if [ -n "${MODEL_NAME}" ]; then \
        HF_HOME=/tmp/bake-hf python3 /app/builder/bake_model.py "${MODEL_NAME}" \
            --revision "${MODEL_REVISION}" --dest /models \
            --token-file /run/secrets/HF_TOKEN \
        && rm -rf /tmp/bake-hf; \
    fi

# --- The worker. It goes into a virtual environment that sees the base image's packages
# (--system-site-packages) and must not shadow any of them that vLLM runs on:
# * constraints, not --no-deps: runpod==1.10.0 alone pulls in a dozen packages the image
#   lacks (boto3, paramiko, inquirerpy, ...). --no-deps would make us list that tree by
#   hand and find a forgotten one only when its import fails at run time; the resolver
#   finds all of them, and the constraints file (every package pip/uv installed into the
#   image's site-packages, at its exact version: torch, the CUDA wheels, vLLM,
#   transformers, fastapi, ...) forbids it to change any. A requirement that would need
#   another version of one of them fails this build instead of breaking vLLM later.
# * a venv, not the system site-packages: packages outside that set (those apt installed
#   for the OS's own tools) may need a newer version for runpod; pip cannot uninstall
#   apt's copies, but in the venv it installs beside them, and the base stays untouched.
COPY pyproject.toml README.md handler.py test_input.json /app/
COPY src/ /app/src/
RUN python3 -m pip list --format=freeze \
        --path "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        > /opt/base-image-constraints.txt \
    && python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir \
        --constraint /opt/base-image-constraints.txt /app \
    && /opt/venv/bin/python -c "import runpod, vlm_worker.serving.worker" \
    && /opt/venv/bin/python /app/builder/check_vllm.py
ENV PATH=/opt/venv/bin:${PATH}

# The base image's entrypoint is `vllm serve`; this worker runs vLLM in its own process.
# On RunPod (RUNPOD_WEBHOOK_GET_JOB set) it serves the queue; `docker run` elsewhere runs
# test_input.json once.
ENTRYPOINT ["python", "-u", "/app/handler.py"]
CMD []
