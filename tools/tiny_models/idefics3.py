"""Tiny Idefics3: a SigLIP-style tower over image tiles, pixel-shuffle connector, Llama 3 decoder.

Idefics3 (and SmolVLM, built on it) splits a large image into a grid of tiles plus a downscaled
global view and spells the grid out in the prompt (``<row_1_col_1>`` ... ``<global-img>``), so
the number of prompt tokens depends on the image's shape; image splitting stays on, as in the
released model, with small tiles so a photo costs a few hundred tokens.

SmolVLM's processor needs the ``num2words`` package, which the worker's environment does not
install, so Idefics3 stands for the pair; vLLM's SmolVLM model class is a thin subclass of its
Idefics3 one.
"""

from __future__ import annotations

from pathlib import Path

from tools.tiny_models import _common as c

NAME = "idefics3"
ARCHITECTURE = "Idefics3ForConditionalGeneration"
VIDEO = False

# Llama 3's control tokens follow its learned vocabulary; Idefics3 added its image tokens after.
TRAILING: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)

# Idefics3-8B-Llama3's template: BOS, capitalised `Role:` prefixes (no space when the message
# opens with an image), <image> for each image part, <end_of_utterance> after each message.
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The real tiles are 364x364 (26x26 patches, shuffled 2x2 to 169 tokens) with images up to
# 4 tiles a side (1456). Tiles of 112 (8x8 patches -> 16 tokens) and images up to 448 keep the
# same tiling arithmetic at a fraction of the cost.
TILE = 112
PATCH = 14
SCALE = 2
LONGEST_EDGE = 4 * TILE


def build_into(out: Path, seed: int) -> None:
    """Write the tiny Idefics3 into ``out``."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tokenizer = c.byte_level_tokenizer(
        trailing=TRAILING,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<|end_of_text|>",
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        model_max_length=10240,
    )
    ids = c.check_ids(tokenizer, TRAILING)
    image_seq_len = (TILE // PATCH) ** 2 // SCALE**2
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TILE,
            "patch_size": PATCH,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": c.padded_vocab(len(tokenizer)),
            "hidden_size": c.TEXT_HIDDEN,
            "intermediate_size": c.TEXT_MLP,
            "num_hidden_layers": c.TEXT_LAYERS,
            "num_attention_heads": c.TEXT_HEADS,
            "num_key_value_heads": c.TEXT_KV_HEADS,
            "head_dim": c.HEAD_DIM,
            "max_position_embeddings": 10240,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": ids["<end_of_utterance>"],
            "pad_token_id": ids["<|end_of_text|>"],
        },
        scale_factor=SCALE,
        image_token_id=ids["<image>"],
        pad_token_id=ids["<|end_of_text|>"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    c.save_model(
        Idefics3ForConditionalGeneration,
        config,
        {
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": [ids["<end_of_utterance>"], ids["<|end_of_text|>"]],
            "pad_token_id": ids["<|end_of_text|>"],
        },
        out,
        seed,
    )
    image_processor = Idefics3ImageProcessor(
        do_convert_rgb=True,
        do_resize=True,
        size={"longest_edge": LONGEST_EDGE},
        resample=1,  # LANCZOS, as released
        do_image_splitting=True,
        max_image_size={"longest_edge": TILE},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    c.save_processor(processor, tokenizer, CHAT_TEMPLATE, out)
