"""Tiny Qwen2-VL: the first Qwen VL with dynamic resolution, M-RoPE and video input.

Qwen2-VL differs from Qwen2.5-VL (``tools/tiny_model.py``) in its vision tower (no windowed
attention, LayerNorm and a GELU MLP) and in its chat template, which has no tool section; the
worker has to serve both, so both are built.
"""

from __future__ import annotations

from pathlib import Path

from tools.tiny_model import train_bpe, wrap_tokenizer
from tools.tiny_models import _common as c

NAME = "qwen2-vl"
ARCHITECTURE = "Qwen2VLForConditionalGeneration"
VIDEO = True

# Qwen2-VL's special tokens in the order its vocabulary lists them (151643..151656); the
# Qwen-based families' vocabularies (Qwen3-VL, InternVL's Qwen2.5 decoder) start with them.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: What Qwen2.5's vocabulary adds next (151657..151664), shared by Qwen3 and InternVL.
QWEN25_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2-VL-Instruct's template: a default system prompt, and one vision span per image or video
# part, numbered when `add_vision_id` is set.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The real processor's pixel bounds are 56*56 .. 16384*28*28; the upper bound is lowered to the
# commonly recommended 256*28*28 so a photo costs about 250 tokens, not thousands, on CPU.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 256 * 28 * 28


def qwen_tokenizer(specials: tuple[str, ...], named: dict[str, str] | None = None):
    """The trained BPE with Qwen's special tokens appended in their real order.

    ``named`` gives some of them attribute names (``tokenizer.video_token`` ...), which is how
    processors such as InternVL's find their tokens in the saved tokenizer config.
    """
    vocab, merges = train_bpe()
    for token in specials:
        vocab[token] = len(vocab)
    if not named:
        return wrap_tokenizer(vocab, merges, list(specials))
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=named,
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    c.check_ids(tokenizer, specials)  # the unnamed ones become special tokens too
    return tokenizer


def build_into(out: Path, seed: int) -> None:
    """Write the tiny Qwen2-VL into ``out``."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = qwen_tokenizer(SPECIAL_TOKENS)
    ids = c.check_ids(tokenizer, SPECIAL_TOKENS)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": c.padded_vocab(len(tokenizer)),
            "hidden_size": c.TEXT_HIDDEN,
            "intermediate_size": c.TEXT_MLP,
            "num_hidden_layers": c.TEXT_LAYERS,
            "num_attention_heads": c.TEXT_HEADS,
            "num_key_value_heads": c.TEXT_KV_HEADS,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "max_window_layers": c.TEXT_LAYERS,
            # M-RoPE sections (temporal, height, width) must sum to head_dim / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [8, 12, 12],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": c.TEXT_HIDDEN,
            "mlp_ratio": 2,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    c.save_model(
        Qwen2VLForConditionalGeneration,
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
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    # The video processor keeps its defaults (128..768 merged patches of 28x28 per frame pair).
    video_processor = Qwen2VLVideoProcessor()
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    c.save_processor(processor, tokenizer, CHAT_TEMPLATE, out)
