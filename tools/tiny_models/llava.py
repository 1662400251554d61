"""Tiny LLaVA 1.5: a CLIP tower, a two-layer MLP projector and a Llama 2 decoder.

LLaVA is the plainest of the families: a fixed-size centre-cropped image becomes a fixed number
of ``<image>`` tokens, and the prompt is the Vicuna ``USER: ... ASSISTANT:`` format with a
SentencePiece tokenizer that adds ``<s>`` itself, so it checks that the worker does not assume
ChatML or a template-supplied BOS.

vLLM 0.26 cannot load it with transformers 5.17: its ``llava`` module (which LLaVA-NeXT and
OneVision also import) imports ``PixtralRotaryEmbedding`` from transformers, which 5.17 removed.
vLLM 0.32 loads and serves it.
"""

from __future__ import annotations

from pathlib import Path

from tools.tiny_models import _common as c

NAME = "llava"
ARCHITECTURE = "LlavaForConditionalGeneration"
VIDEO = False

# Llama 2's control tokens take ids 0..2; LLaVA-1.5-hf appended <image> (32000) and <pad> (32001).
LEADING: tuple[str, ...] = ("<unk>", "<s>", "</s>")
TRAILING: tuple[str, ...] = ("<image>", "<pad>")

# llava-1.5-hf's template: `ROLE: ` prefixes (none for system), a message's images first, each
# followed by a newline, then its texts each followed by a space; `ASSISTANT:` to answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] + ' ' }}"
    "{% endgeneration %}{% else %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The real tower sees 336x336 crops (576 tokens); 112x112 keeps CLIP's resize-shortest-edge then
# centre-crop logic at 8x8 = 64 tokens an image.
IMAGE_SIZE = 112
PATCH = 14


def build_into(out: Path, seed: int) -> None:
    """Write the tiny LLaVA 1.5 into ``out``."""
    from transformers import (
        CLIPImageProcessor,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vocab, merges = c.sentencepiece_vocab(LEADING, TRAILING)
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        model_max_length=4096,
    )
    ids = c.check_ids(tokenizer, LEADING + TRAILING)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
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
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["<image>"],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    c.save_model(
        LlavaForConditionalGeneration,
        config,
        {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]},
        out,
        seed,
    )
    # llava-1.5-hf keeps the CLIP tower's `vision_model.` level, which transformers 5 drops on
    # save; vLLM loads by the released names.
    c.rename_weights(out, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_convert_rgb=True,
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    c.save_processor(processor, tokenizer, CHAT_TEMPLATE, out)
