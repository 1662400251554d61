"""Tiny InternVL (HF format, as InternVL3-hf): an InternViT tower over 448-style tiles, pixel
shuffle and an MLP projector into a Qwen2 decoder.

InternVL takes the place of Mistral 3 as the sixth family: vLLM 0.26's Mistral 3 (and LLaVA)
model modules import ``PixtralRotaryEmbedding`` from transformers' Pixtral module, which
transformers 5.17 no longer has, so those architectures cannot even be inspected by vLLM on this
stack. InternVL's dynamic tiling (a grid of tiles chosen by aspect ratio plus a thumbnail, each
tile wrapped in ``<img>``..``</img>``) is also a distinct image path worth covering.
"""

from __future__ import annotations

from pathlib import Path

from tools.tiny_models import _common as c
from tools.tiny_models.qwen2_vl import QWEN25_ADDED_TOKENS, qwen_tokenizer
from tools.tiny_models.qwen2_vl import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS

NAME = "internvl"
ARCHITECTURE = "InternVLForConditionalGeneration"
VIDEO = True

# Qwen2.5's special tokens (the decoder's vocabulary), then InternVL's added tokens in its order.
SPECIAL_TOKENS: tuple[str, ...] = (
    *QWEN_SPECIAL_TOKENS,
    *QWEN25_ADDED_TOKENS,
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
)

# InternVL3-hf's template: ChatML turns; an image part becomes `<IMG_CONTEXT>` and a video part
# `<video>`, each on its own line; the processor expands them into tiles / frames.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Real tiles are 448x448 (32x32 patches, shuffled to 256 tokens), 1..12 tiles plus a thumbnail.
# 112x112 tiles (8x8 patches -> 16 tokens) keep the tiling arithmetic at a fraction of the cost.
TILE = 112
PATCH = 14
DOWNSAMPLE = 0.5
MAX_TILES = 12


def build_into(out: Path, seed: int) -> None:
    """Write the tiny InternVL into ``out``."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = qwen_tokenizer(
        SPECIAL_TOKENS,
        named={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    ids = c.check_ids(tokenizer, SPECIAL_TOKENS)
    image_seq_length = int((TILE // PATCH) ** 2 * DOWNSAMPLE**2)
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [TILE, TILE],
            "patch_size": [PATCH, PATCH],
            "use_qk_norm": False,
            "norm_type": "layer_norm",
            "use_mean_pooling": True,
            "layer_scale_init_value": 0.1,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": c.padded_vocab(len(tokenizer)),
            "hidden_size": c.TEXT_HIDDEN,
            "intermediate_size": c.TEXT_MLP,
            "num_hidden_layers": c.TEXT_LAYERS,
            "num_attention_heads": c.TEXT_HEADS,
            "num_key_value_heads": c.TEXT_KV_HEADS,
            "head_dim": c.HEAD_DIM,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=image_seq_length,
        downsample_ratio=DOWNSAMPLE,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    c.save_model(
        InternVLForConditionalGeneration,
        config,
        {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        },
        out,
        seed,
    )
    image_processor = GotOcr2ImageProcessor(
        size={"height": TILE, "width": TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    video_processor = InternVLVideoProcessor(
        size={"height": TILE, "width": TILE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )
    c.save_processor(processor, tokenizer, CHAT_TEMPLATE, out)
