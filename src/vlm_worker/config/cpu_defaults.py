"""Engine defaults for a machine without a GPU, so ``python handler.py`` runs there as is.

vLLM's defaults assume a GPU. On its CPU backend they fail or crawl:

* ``GPU_MEMORY_UTILIZATION`` (0.92 by default) is read as the share of the *machine's*
  memory to reserve, and the engine refuses to start when that much is not free, which
  on a desktop or a CI runner it never is. An explicit KV cache size skips that check;
* without ``ENFORCE_EAGER`` the model is compiled with torch.compile first (minutes);
* float16, the dtype many checkpoints declare, is poorly supported on CPUs: bfloat16 is;
* the tiny test model declares a long context and the default batch of sequences, which
  only cost memory on a CPU.

Each default applies only where the environment leaves the value unset (the same
variables override it), and the worker logs what it chose. ``VLLM_CPU_KVCACHE_SPACE``,
vLLM's own older variable for the KV cache, counts as set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlm_worker.config.engine_args import EngineSpec

GIB = 1 << 30

#: The tiny test model's context and batch on a CPU: what its tests and demo need.
TINY_MAX_MODEL_LEN = 4096
TINY_MAX_NUM_SEQS = 8


def cpu_engine_defaults(
    spec: EngineSpec, env: Mapping[str, str], *, tiny: bool, available_bytes: int
) -> dict[str, Any]:
    """The engine arguments to add for a CPU engine: only those nobody set."""
    chosen: dict[str, Any] = {}
    kwargs = spec.kwargs
    if "enforce_eager" not in kwargs:
        chosen["enforce_eager"] = True
    if "dtype" not in kwargs:
        chosen["dtype"] = "bfloat16"
    memory_set = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & kwargs.keys()
    if not memory_set and not env.get("VLLM_CPU_KVCACHE_SPACE", "").strip():
        # a quarter of what is free now, at least 1 GiB: the weights and the worker's own
        # image work need the rest
        chosen["kv_cache_memory_bytes"] = GIB if tiny else max(GIB, available_bytes // 4)
    if tiny:
        if "max_model_len" not in kwargs:
            chosen["max_model_len"] = TINY_MAX_MODEL_LEN
        if "max_num_seqs" not in kwargs:
            chosen["max_num_seqs"] = TINY_MAX_NUM_SEQS
    return chosen


def runs_on_cpu() -> bool:
    """Whether vLLM will run the model on the CPU (no GPU, or the CPU build of vLLM)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
