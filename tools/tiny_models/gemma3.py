"""Tiny Gemma 3: a SigLIP tower pooled to a fixed token grid, a Gemma 3 decoder with
interleaved sliding-window and global attention.

Gemma 3's template speaks ``user``/``model`` turns, folds the system prompt into the first user
turn and marks an image with ``<start_of_image>``, which the processor widens into
``\\n\\n<start_of_image>`` + soft tokens + ``<end_of_image>\\n\\n``; the worker must not assume
the placeholder it writes is the token the model consumes.
"""

from __future__ import annotations

from pathlib import Path

from tools.tiny_models import _common as c

NAME = "gemma3"
ARCHITECTURE = "Gemma3ForConditionalGeneration"
VIDEO = False

# Gemma's control tokens lead the vocabulary (0..4, then the turn markers); the image tokens sit
# at the end of it (255999, 256000, 262144 in the real one).
LEADING: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "[multimodal]",
    "<start_of_turn>",
    "<end_of_turn>",
)
TRAILING: tuple[str, ...] = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")

# gemma-3-it's template: BOS first, the system prompt prepended to the first user turn, strict
# user/model alternation, text trimmed, images as <start_of_image>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# The real tower sees 896x896 (64x64 patches pooled to 16x16 = 256 tokens); 224x224 with the same
# patch gives 16x16 patches, pooled 2x2 to 8x8 = 64 tokens an image.
IMAGE_SIZE = 224
PATCH = 14
TOKENS_PER_IMAGE = 64


def build_into(out: Path, seed: int) -> None:
    """Write the tiny Gemma 3 into ``out``."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        GemmaTokenizer,
    )

    vocab, merges = c.sentencepiece_vocab(LEADING, TRAILING, newline_runs=4)
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={
            "start_of_turn_token": "<start_of_turn>",
            "end_of_turn_token": "<end_of_turn>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=131072,
    )
    ids = c.check_ids(tokenizer, LEADING + TRAILING)
    config = Gemma3Config(
        text_config={
            "vocab_size": c.padded_vocab(len(tokenizer)),
            "hidden_size": c.TEXT_HIDDEN,
            "intermediate_size": c.TEXT_MLP,
            "num_hidden_layers": c.TEXT_LAYERS,
            "num_attention_heads": c.TEXT_HEADS,
            "num_key_value_heads": c.TEXT_KV_HEADS,
            "head_dim": c.HEAD_DIM,
            "query_pre_attn_scalar": c.HEAD_DIM,
            "max_position_embeddings": 131072,
            # One local and one global layer, as the real 5:1 pattern interleaves them.
            "sliding_window": 512,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<eos>"],
            "pad_token_id": ids["<pad>"],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
            "vision_use_head": False,
        },
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        dtype="bfloat16",
    )
    c.save_model(
        Gemma3ForConditionalGeneration,
        config,
        {
            "bos_token_id": ids["<bos>"],
            "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
            "pad_token_id": ids["<pad>"],
        },
        out,
        seed,
    )
    # Released Gemma 3 checkpoints (and vLLM's loader) keep SigLIP's inner `vision_model.` level.
    c.rename_weights(out, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    # Pan-and-scan stays off, as in the released processor config (it is a request-time option).
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
        pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_IMAGE,
        chat_template=CHAT_TEMPLATE,
    )
    c.save_processor(processor, tokenizer, CHAT_TEMPLATE, out)
