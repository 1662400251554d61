"""A random-weight LoRA adapter for the tiny model, written as PEFT writes one.

Rank-8 ``q_proj`` and ``v_proj`` deltas in both text layers, seeded: enough to change
what the model says, which is what a test of adapter routing needs.
"""

from __future__ import annotations

import json
from pathlib import Path

RANK = 8
HIDDEN = 128  # tools.tiny_model's TEXT_HIDDEN
OUT = {"q_proj": 128, "v_proj": 64}  # 2 heads x 64, 1 KV head x 64


def build_lora_adapter(out: Path, seed: int = 1) -> Path:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for proj, out_dim in OUT.items():
            base = f"base_model.model.model.language_model.layers.{layer}.self_attn.{proj}"
            a = torch.randn(RANK, HIDDEN, generator=generator) * 0.5
            b = torch.randn(out_dim, RANK, generator=generator) * 0.5
            tensors[f"{base}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{base}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": sorted(OUT),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": "tiny-qwen2.5-vl",
    }
    (out / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out
