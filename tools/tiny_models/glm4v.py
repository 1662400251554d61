"""Tiny GLM-4.1V: a Qwen2-VL-style patch tower with 2-D RoPE and learned positions, over GLM-4.

GLM-4.1V is the one family here whose prompt has no ChatML: turns are ``<|user|>`` /
``<|assistant|>`` markers after a ``[gMASK]<sop>`` prefix, images and videos are wrapped in
``<|begin_of_image|>`` / ``<|begin_of_video|>`` pairs, and the processor expands a video into
one ``<|begin_of_image|>``..``<|end_of_image|>`` span per frame pair followed by that pair's
whole-second timestamp as plain text, so vLLM needs frame metadata with each video. The decoder
applies rotary embeddings to half of each head (``partial_rotary_factor`` 0.5).
"""

from __future__ import annotations

from pathlib import Path

from tools.tiny_models import _common as c

NAME = "glm4v"
ARCHITECTURE = "Glm4vForConditionalGeneration"
VIDEO = True

# GLM-4's control tokens in vocabulary order (151329..151344 in GLM-4.1V, where the config's
# image/video ids point at the last two), then the thinking and box tokens the checkpoint adds.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
)

# GLM-4.1V-9B-Thinking's template, rendered the same way: a `[gMASK]<sop>` prefix, no default
# system prompt, role markers with no closing token, `<|user|>` followed by a newline, one wrapped
# placeholder per image or video part (a part counts as video first, as in the original), and an
# assistant turn that may carry `metadata` on its marker line.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}{{- '<|system|>\\n' }}"
    "{%- if msg.content is string %}{{- msg.content }}{%- else %}"
    "{%- for item in msg.content %}{%- if item.type == 'text' %}{{- item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'user' %}{{- '<|user|>\\n' }}"
    "{%- if msg.content is string %}{{- msg.content }}{%- else %}"
    "{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}"
    "{{- '<|begin_of_video|><|video|><|end_of_video|>' }}"
    "{%- elif item.type == 'image' or 'image' in item %}"
    "{{- '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{%- elif item.type == 'text' %}{{- item.text }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}{{- '<|assistant|>' }}"
    "{%- if msg.metadata %}{{- msg.metadata }}{%- endif %}{{- '\\n' }}"
    "{%- if msg.content is string %}{{- msg.content }}{%- else %}"
    "{%- for item in msg.content %}{%- if item.type == 'text' %}{{- item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

# The real image bounds are 112*112 .. 28*28*2*15000 pixels *including* the temporal factor of 2
# (an image is one frame pair); the upper one is lowered to 256 merged 28x28 tokens so a photo
# stays cheap on CPU. The smart_resize logic (and vLLM's copy of it) is untouched.
MIN_PIXELS = 112 * 112
MAX_PIXELS = 2 * 256 * 28 * 28


def build_into(out: Path, seed: int) -> None:
    """Write the tiny GLM-4.1V into ``out``."""
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    tokenizer = c.byte_level_tokenizer(
        trailing=SPECIAL_TOKENS,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=65536,
    )
    ids = c.check_ids(tokenizer, SPECIAL_TOKENS)
    stops = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    config = Glm4vConfig(
        text_config={
            "vocab_size": c.padded_vocab(len(tokenizer)),
            "hidden_size": c.TEXT_HIDDEN,
            "intermediate_size": c.TEXT_MLP,
            "num_hidden_layers": c.TEXT_LAYERS,
            "num_attention_heads": c.TEXT_HEADS,
            "num_key_value_heads": c.TEXT_KV_HEADS,
            "max_position_embeddings": 65536,
            "rms_norm_eps": 1e-5,
            # Rotary covers half of each 64-wide head; the M-RoPE sections (temporal, height,
            # width) must sum to a quarter of head_dim, as [8, 12, 12] does for the real 128.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [4, 6, 6],
            },
            "eos_token_id": stops,
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "in_channels": 3,
            # Learned position embeddings on an 8x8 grid (image_size / patch_size), interpolated
            # to each image as the real 24x24 grid is.
            "image_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            # The blocks' MLP is out_hidden_size wide and the merger's is intermediate_size, as
            # in the real tower (4096 and the decoder's 13696).
            "out_hidden_size": c.TEXT_HIDDEN,
            "intermediate_size": c.TEXT_MLP,
            "rms_norm_eps": 1e-5,
        },
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    c.save_model(
        Glm4vForConditionalGeneration,
        config,
        {"eos_token_id": stops, "pad_token_id": ids["<|endoftext|>"]},
        out,
        seed,
    )
    image_processor = Glm4vImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    # Video keeps GLM-4.1V's defaults: 2 fps sampling (at most 300 s), 112*112 .. 28*28*2*30000
    # pixels over the whole clip.
    video_processor = Glm4vVideoProcessor()
    processor = Glm4vProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    c.save_processor(processor, tokenizer, CHAT_TEMPLATE, out)
