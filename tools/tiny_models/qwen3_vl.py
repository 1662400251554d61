"""Tiny Qwen3-VL (dense): 16-pixel patches, DeepStack and interleaved M-RoPE, timestamped video.

Qwen3-VL changes what the worker sees at the edges: the template drops the default system
prompt and carries Qwen3's tool section, and the processor expands a video into per-frame
``<t seconds>`` timestamps, so vLLM needs frame metadata with each video.
"""

from __future__ import annotations

from pathlib import Path

from tools.tiny_models import _common as c
from tools.tiny_models.qwen2_vl import QWEN25_ADDED_TOKENS, qwen_tokenizer
from tools.tiny_models.qwen2_vl import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS

NAME = "qwen3-vl"
ARCHITECTURE = "Qwen3VLForConditionalGeneration"
VIDEO = True

# Qwen3's special and added tokens in vocabulary order (151643..151668).
SPECIAL_TOKENS: tuple[str, ...] = (
    *QWEN_SPECIAL_TOKENS,
    *QWEN25_ADDED_TOKENS,
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# Qwen3-VL-Instruct's template: no default system prompt; with tools, the system turn lists them
# (hermes-style calls); consecutive tool results share one user turn; text parts of a system or
# assistant message are joined.
_TEXT_PARTS = (
    "{%- if m.content is string %}{{- m.content }}{%- else %}"
    "{%- for part in m.content %}{%- if 'text' in part %}{{- part.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
)
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{%- set m = messages[0] %}"
    + _TEXT_PARTS
    + "{{- '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": '
    '<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' %}{%- set m = messages[0] %}"
    "{{- '<|im_start|>system\\n' }}" + _TEXT_PARTS + "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.content is string %}{{- m.content }}{%- else %}{%- for part in m.content %}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'video' or 'video' in part %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}" + _TEXT_PARTS + ""
    "{%- for call in m.tool_calls or [] %}"
    "{%- if not loop.first or m.content %}{{- '\\n' }}{%- endif %}"
    "{%- set f = call.function if call.function else call %}"
    '{{- \'<tool_call>\\n{"name": "\' + f.name + \'", "arguments": \' }}'
    "{%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}"
    "{%- endif %}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}" + _TEXT_PARTS + "{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Real bounds are 65536 .. 16777216 pixels (64..16384 merged 32x32 tokens); the upper one is
# lowered to 256 tokens a photo so CPU tests stay quick. The shape logic is untouched.
MIN_PIXELS = 64 * 32 * 32
MAX_PIXELS = 256 * 32 * 32


def build_into(out: Path, seed: int) -> None:
    """Write the tiny Qwen3-VL into ``out``."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = qwen_tokenizer(SPECIAL_TOKENS)
    ids = c.check_ids(tokenizer, SPECIAL_TOKENS)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": c.padded_vocab(len(tokenizer)),
            "hidden_size": c.TEXT_HIDDEN,
            "intermediate_size": c.TEXT_MLP,
            "num_hidden_layers": c.TEXT_LAYERS,
            "num_attention_heads": c.TEXT_HEADS,
            "num_key_value_heads": c.TEXT_KV_HEADS,
            "head_dim": c.HEAD_DIM,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            # Interleaved M-RoPE; the sections must sum to head_dim / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [8, 12, 12],
                "mrope_interleaved": True,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": c.TEXT_HIDDEN,
            # Learned position embeddings on a 16x16 grid, interpolated to each image as in
            # the real 48x48 grid.
            "num_position_embeddings": 256,
            # DeepStack: features of block 0 are also injected into the decoder.
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    c.save_model(
        Qwen3VLForConditionalGeneration,
        config,
        {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        },
        out,
        seed,
    )
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    # Video keeps Qwen3-VL's defaults: 2 fps sampling, 4..768 frames, 128..768 tokens a frame pair.
    video_processor = Qwen3VLVideoProcessor()
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    c.save_processor(processor, tokenizer, CHAT_TEMPLATE, out)
