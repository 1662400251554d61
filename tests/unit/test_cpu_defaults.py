"""On a machine without a GPU the worker picks engine defaults that start there."""

from __future__ import annotations

import json

import pytest

from vlm_worker.config.cpu_defaults import GIB, cpu_engine_defaults
from vlm_worker.config.engine_args import build_engine_kwargs
from vlm_worker.config.settings import load_worker_settings
from vlm_worker.serving.worker import engine_spec


def defaults(env: dict[str, str], *, available: int = 16 * GIB) -> dict:
    settings = load_worker_settings(env)
    spec = build_engine_kwargs(env, settings)
    return cpu_engine_defaults(spec, env, tiny=settings.uses_tiny_model, available_bytes=available)


def test_the_tiny_model_gets_a_small_engine_that_skips_the_memory_share_check():
    assert defaults({}) == {
        "enforce_eager": True,
        "dtype": "bfloat16",
        "kv_cache_memory_bytes": GIB,
        "max_model_len": 4096,
        "max_num_seqs": 8,
    }


def test_a_real_model_gets_a_quarter_of_free_memory_and_its_own_context():
    env = {"MODEL_NAME": "Qwen/Qwen2.5-VL-3B-Instruct"}
    assert defaults(env, available=20 * GIB) == {
        "enforce_eager": True,
        "dtype": "bfloat16",
        "kv_cache_memory_bytes": 5 * GIB,
    }
    assert defaults(env, available=GIB)["kv_cache_memory_bytes"] == GIB  # never below 1 GiB


@pytest.mark.parametrize(
    ("env", "kept"),
    [
        ({"ENFORCE_EAGER": "false"}, "enforce_eager"),
        ({"DTYPE": "float32"}, "dtype"),
        ({"MAX_MODEL_LEN": "2048"}, "max_model_len"),
        ({"MAX_NUM_SEQS": "2"}, "max_num_seqs"),
        ({"KV_CACHE_MEMORY_BYTES": "123456789"}, "kv_cache_memory_bytes"),
        ({"GPU_MEMORY_UTILIZATION": "0.3"}, "kv_cache_memory_bytes"),
        ({"VLLM_CPU_KVCACHE_SPACE": "2"}, "kv_cache_memory_bytes"),
    ],
)
def test_every_default_yields_to_the_variable_that_sets_it(env, kept):
    chosen = defaults(env)
    assert kept not in chosen
    assert len(chosen) == 4  # the others still apply


def test_engine_spec_applies_them_on_cpu_only_and_logs_them(tiny_model, caplog):
    caplog.set_level("INFO", logger="vlm_worker")
    settings = load_worker_settings({})
    on_cpu = engine_spec({}, settings, on_cpu=True)
    assert on_cpu.kwargs["enforce_eager"] is True and on_cpu.kwargs["max_model_len"] == 4096
    (logged,) = [r for r in caplog.records if r.getMessage().startswith("no GPU")]
    assert json.loads(logged.cpu_defaults)["kv_cache_memory_bytes"] == GIB
    # explicit values are still the user's
    assert "enforce_eager" not in on_cpu.explicit
    on_gpu = engine_spec({}, settings, on_cpu=False)
    assert "enforce_eager" not in on_gpu.kwargs and "kv_cache_memory_bytes" not in on_gpu.kwargs
