"""A model folder shaped like a real checkpoint, without its weights, for GPU benchmarks.

With vLLM's ``load_format="dummy"`` (random weights) a folder holding only the real
``config.json`` dimensions, a tokenizer and a processor gives the real model's GPU cost
(attention, MLP, vision tower, KV cache) without downloading 16 GB. The tokenizer is the
tiny model's trained BPE padded with filler tokens to the real vocabulary size, with Qwen's
special tokens at their real ids, so every id the random model samples can be detokenized
and streaming costs what it costs with the real tokenizer's vocabulary size.

    python -m tools.shaped_model DIR [--shape qwen2.5-vl-7b]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tools.tiny_model import QWEN_SPECIAL_TOKENS, chat_template, train_bpe, wrap_tokenizer

#: Qwen2.5-VL-7B-Instruct's published dimensions.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": {
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "hidden_act": "silu",
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "max_window_layers": 28,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
        },
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "out_hidden_size": 3584,
        },
        "min_pixels": 3136,
        "max_pixels": 12845056,
    },
}

#: Where Qwen2/2.5 tokenizers put their special tokens.
FIRST_SPECIAL_ID = 151643
QWEN_SPECIAL_ORDER = (
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


def big_tokenizer(vocab_size: int) -> Any:
    vocab, merges = train_bpe()
    filler = 0

    def pad_to(n: int) -> None:
        nonlocal filler
        while len(vocab) < n:
            vocab[f"f{filler}"] = len(vocab)
            filler += 1

    pad_to(FIRST_SPECIAL_ID)
    for token in QWEN_SPECIAL_ORDER:
        vocab[token] = len(vocab)
    pad_to(vocab_size)
    assert set(QWEN_SPECIAL_TOKENS) <= set(QWEN_SPECIAL_ORDER)
    return wrap_tokenizer(vocab, merges, list(QWEN_SPECIAL_ORDER))


def build_shaped_model(out_dir: str | Path, shape: str = "qwen2.5-vl-7b") -> Path:
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    dims = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = big_tokenizer(dims["text_config"]["vocab_size"])
    template = chat_template("qwen")
    tokenizer.chat_template = template
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_ORDER}
    assert ids["<|image_pad|>"] == 151655 and ids["<|im_end|>"] == 151645
    config = Qwen2_5_VLConfig(
        text_config={
            **dims["text_config"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config=dims["vision_config"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]  # vLLM picks the class by it
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    ).save_pretrained(out)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": dims["min_pixels"], "longest_edge": dims["max_pixels"]},
            min_pixels=dims["min_pixels"],
            max_pixels=dims["max_pixels"],
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    (out / "shaped_model.json").write_text(
        json.dumps({"shape": shape, "weights": "none: serve with LOAD_FORMAT=dummy"}, indent=2)
        + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-vl-7b")
    args = parser.parse_args(argv)
    print(build_shaped_model(args.out_dir, args.shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
