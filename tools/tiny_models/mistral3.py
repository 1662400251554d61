"""Tiny Mistral 3 (Mistral Small 3.1, HF format): a Pixtral tower with 2D RoPE at native aspect
ratio, a patch-merging projector and a Mistral decoder.

Pixtral spells an image as rows of ``[IMG]`` tokens separated by ``[IMG_BREAK]`` and closed by
``[IMG_END]``, so the prompt length depends on the image's shape; the template wraps turns in
``[INST]``/``[/INST]`` and always emits a ``[SYSTEM_PROMPT]`` (a default one when none is given).

Not in ``FAMILIES``: vLLM 0.26's ``mistral3`` module imports names from transformers' Pixtral
module that transformers 5.17 removed, so vLLM cannot load any Mistral 3 on this stack. The
build is kept (``--only mistral3``) for transformers-side tests and for the next vLLM.
"""

from __future__ import annotations

from pathlib import Path

from tools.tiny_models import _common as c

NAME = "mistral3"
ARCHITECTURE = "Mistral3ForConditionalGeneration"
VIDEO = False

# Tekken's control tokens take the first ids, in its order (0..19); text tokens follow.
LEADING: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)

DEFAULT_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French "
    "startup headquartered in Paris. When you're not sure about some information, you say that "
    "you don't have the information and don't make up anything."
)

# Mistral-Small-3.1-Instruct (HF) template: BOS, a system prompt block (the default one when the
# conversation has none), user turns in [INST]..[/INST] with [IMG] per image part, assistant
# turns closed by EOS, tool calls as [TOOL_CALLS] + JSON, results in [TOOL_RESULTS].
CHAT_TEMPLATE = (
    "{%- set default_system_message = '" + DEFAULT_SYSTEM.replace("'", "\\'") + "' %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and tools %}{{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}"
    "{%- endif %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message "
    "content!') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'system' %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'][0]['text'] %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- elif message['content'] %}{{- message['content'][0]['text'] }}{%- endif %}"
    "{%- if message['tool_calls'] %}{{- '[TOOL_CALLS]' }}"
    "{{- message['tool_calls'] | map(attribute='function') | list | tojson }}{%- endif %}"
    "{{- eos_token }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '[TOOL_RESULTS]' + message['content'] | string + '[/TOOL_RESULTS]' }}"
    "{%- else %}{{- raise_exception('Only user, system, assistant and tool roles are "
    "supported!') }}{%- endif %}"
    "{%- endfor %}"
)

# The real tower takes images up to 1540 px on the long side in 14 px patches, merged 2x2 by the
# projector. 336 px keeps the aspect-preserving resize and [IMG_BREAK] rows at about a hundred
# tokens for a photo.
LONGEST_EDGE = 336
PATCH = 14
MERGE = 2


def build_into(out: Path, seed: int) -> None:
    """Write the tiny Mistral 3 into ``out``."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    tokenizer = c.byte_level_tokenizer(
        leading=LEADING,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=131072,
    )
    ids = c.check_ids(tokenizer, LEADING)
    config = Mistral3Config(
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 16,
            "image_size": LONGEST_EDGE,
            "patch_size": PATCH,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        text_config={
            "model_type": "mistral",
            "vocab_size": c.padded_vocab(len(tokenizer)),
            "hidden_size": c.TEXT_HIDDEN,
            "intermediate_size": c.TEXT_MLP,
            "num_hidden_layers": c.TEXT_LAYERS,
            "num_attention_heads": c.TEXT_HEADS,
            "num_key_value_heads": c.TEXT_KV_HEADS,
            "head_dim": c.HEAD_DIM,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "sliding_window": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000000.0},
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["[IMG]"],
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    c.save_model(
        Mistral3ForConditionalGeneration,
        config,
        {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]},
        out,
        seed,
    )
    image_processor = PixtralImageProcessor(
        do_resize=True,
        size={"longest_edge": LONGEST_EDGE},
        patch_size={"height": PATCH, "width": PATCH},
        resample=3,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    processor = PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        chat_template=CHAT_TEMPLATE,
    )
    c.save_processor(processor, tokenizer, CHAT_TEMPLATE, out)
