"""Build a tiny, random-weight Qwen2.5-VL checkpoint for tests and demos.

The worker has to be exercised end to end (processor, chat template, vLLM engine) on machines
that have neither a GPU nor network access to the Hugging Face hub, so nothing can be
downloaded. This module fabricates a complete model directory instead: the genuine
Qwen2.5-VL architecture (so vLLM takes the same code path it takes in production), shrunk until
it loads in a second and runs on two CPU cores, with a locally trained byte-level BPE tokenizer
and a Qwen2.5-VL-style processor and chat template.

The weights are seeded and the tokenizer is trained on a fixed built-in text, so two builds with
the same arguments are byte-for-byte identical; tests can cache the directory by its arguments.
A ``tiny_model.json`` marker records those arguments and that the weights are random.

Usage::

    python -m tools.tiny_model DIR [--template qwen|opencua] [--seed N] [--force]

Sizes chosen, and why:

* Text decoder: hidden 128, 2 layers, 2 attention heads, 1 KV head, head_dim 64, MLP 256.
  vLLM's CPU attention backend rejects head_dim 16, so the heads are kept at 64 wide.
  M-RoPE sections are ``[8, 12, 12]``, which must sum to ``head_dim / 2 = 32``.
* Vision tower: depth 2, width 32, 2 heads, MLP 64, patch 14, 2x2 spatial merge, temporal patch
  2, window 112, full attention in block 1 (so both the windowed and the full-attention
  paths run), projecting into the 128-wide text stream.
* Image processor: ``min_pixels = 56 * 56 = 3136`` and ``max_pixels = 1280 * 28 * 28 =
  1003520``, the Qwen2.5-VL defaults, so image-token counts and resizing in tests match what
  the production model does. The tiny vision tower keeps even 1280-token images cheap.
* Weights are saved in bfloat16 (about 1 MB), the dtype the worker serves with.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["TEMPLATES", "build_tiny_model", "is_complete", "main"]

TEMPLATES: tuple[str, ...] = ("qwen", "opencua")

# Written last into the build directory; records what was built so that a later call with
# different arguments is not silently answered with the wrong model.
MARKER_FILE = "tiny_model.json"
#: Bumped whenever the built model changes (2: tool-call tokens and a tools template), so
#: a model left by an older builder is rebuilt rather than served.
_MARKER_FORMAT = 2

# The files without which transformers or vLLM cannot load the directory. A directory holding
# all of them is treated as a finished model.
REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "chat_template.jinja",
)

# Qwen's special tokens, in the order Qwen2.5-VL's vocabulary lists them, so ids keep the same
# relative layout (they sit after the learned BPE vocabulary, as in the real tokenizer).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5's tool-calling tags: hermes-style tool calls, as vLLM's `hermes` parser reads them.
TOOL_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
# OpenCUA marks images with its own span; the worker rewrites it to the Qwen span before the
# engine sees the prompt, so the tokenizer must know these tokens but the model config does not.
OPENCUA_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|media_begin|>",
    "<|media_content|>",
    "<|media_end|>",
    "<|media_pad|>",
)

QWEN_IMAGE_SPAN = "<|vision_start|><|image_pad|><|vision_end|>"
OPENCUA_IMAGE_SPAN = "<|media_begin|><|media_content|><|media_pad|><|media_end|>"
VIDEO_SPAN = "<|vision_start|><|video_pad|><|vision_end|>"

MIN_PIXELS = 56 * 56
MAX_PIXELS = 1280 * 28 * 28

TEXT_HIDDEN = 128
BPE_VOCAB_SIZE = 1024
# Embedding rows are padded to a multiple of this, like Qwen's own padded vocabulary, so that
# the model's vocab_size is larger than the tokenizer and padding ids exist.
VOCAB_PAD_MULTIPLE = 64

# The tokenizer is trained on this text. It only has to yield a few hundred merges so that
# ordinary English prompts encode into plausible, multi-byte tokens; unseen text still encodes
# because the byte-level alphabet is always part of the vocabulary.
_CORPUS = """\
You are a helpful assistant. Describe the image in one sentence.
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
What is shown in this screenshot? Click the button that says Submit, then type your name
into the text field and press Enter. Scroll down to the bottom of the page and open the
settings menu. The window contains a toolbar, a sidebar, a search box and a list of files.
Please answer the question about the picture: how many people are standing near the red car?
There are two cats sitting on a wooden table next to a blue cup of coffee and a laptop.
The weather today is sunny with a light breeze; tomorrow there will be rain in the afternoon.
Find the icon in the top left corner of the screen and return its coordinates as (x, y).
The user wants to move the mouse to the close button and click it once, not twice.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 28 32 64 100 128 224 256 300 512 1024 2048 2025.
Assistant: Sure! Here is a short description of the image, followed by a longer summary.
The model reads the prompt, looks at the pixels, and writes the answer token by token.
Mountains, rivers, forests, cities, streets, houses, trees, flowers, birds and people.
Open the browser, go to the address bar, and search for the nearest train station.
This document explains how the worker loads a vision language model and serves requests.
Select all the text, copy it, and paste it into the new document; then save the file.
A dog runs across the green field while children play with a yellow ball in the park.
The chart shows sales rising from January to June and falling slightly in July and August.
Is there any text in the image? If so, read it out loud exactly as it is written there.
"""


def _chat_template(image_span: str) -> str:
    """Render a Qwen2.5-VL chat template whose image parts expand to ``image_span``.

    The two variants differ only in how an image is marked, which is exactly what the worker's
    OpenCUA support has to translate; everything else follows Qwen2.5-VL's template, including
    its default system prompt, so rendered prompts look like production ones.
    """
    return (
        "{% set image_count = namespace(value=0) %}"
        "{% set video_count = namespace(value=0) %}"
        # With tools, the system turn lists them and says how to call one (Qwen2.5's way).
        "{% if tools %}<|im_start|>system\n"
        "{% if messages[0]['role'] == 'system' and messages[0]['content'] is string %}"
        "{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}"
        "\n\n# Tools\n\nYou may call these functions:\n<tools>"
        "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
        "To call one, answer <tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n{% endif %}"
        "{% for message in messages %}"
        "{% if tools and loop.first and message['role'] == 'system' %}"
        "{% elif message['role'] == 'tool' %}"
        "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response>"
        "<|im_end|>\n"
        "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
        "<|im_start|>assistant\n{{ message['content'] or '' }}"
        "{% for call in message['tool_calls'] %}\n<tool_call>\n"
        '{"name": "{{ call[\'function\'][\'name\'] }}", "arguments": '
        "{{ call['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
        "{% else %}"
        "{% if loop.first and message['role'] != 'system' and not tools %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}<|im_end|>\n"
        "{% else %}"
        "{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "{% set image_count.value = image_count.value + 1 %}"
        "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
        f"{image_span}"
        "{% elif content['type'] == 'video' or 'video' in content %}"
        "{% set video_count.value = video_count.value + 1 %}"
        "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
        f"{VIDEO_SPAN}"
        "{% elif 'text' in content %}"
        "{{ content['text'] }}"
        "{% endif %}"
        "{% endfor %}"
        "<|im_end|>\n"
        "{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def chat_template(template: str) -> str:
    """Return the chat template text for ``template`` (``"qwen"`` or ``"opencua"``)."""
    _check_template(template)
    return _chat_template(OPENCUA_IMAGE_SPAN if template == "opencua" else QWEN_IMAGE_SPAN)


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")


def _marker(template: str, seed: int) -> dict[str, Any]:
    return {"format": _MARKER_FORMAT, "template": template, "seed": seed, "random_weights": True}


def is_complete(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds every file needed to load a model.

    Builds are renamed into place only when finished, so a directory that passes this check was
    not left half-written by an interrupted build.
    """
    path = Path(model_dir)
    return path.is_dir() and all((path / name).is_file() for name in REQUIRED_FILES)


def train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on the built-in corpus: (vocab, merges), no special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)

    state = json.loads(bpe.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges = [tuple(m.split(" ", 1) if isinstance(m, str) else m) for m in state["model"]["merges"]]
    return vocab, merges  # type: ignore[return-value]


def wrap_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]
) -> Any:
    """Qwen's tokenizer class over a vocabulary that already holds the special tokens.

    Qwen2Tokenizer (rather than a generic fast tokenizer) is used so tokenizer_config.json names
    the class the real checkpoints name, and the pre-tokenizer matches Qwen's regex split.
    """
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in specials if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def _train_tokenizer(template: str) -> Any:
    """The tiny model's tokenizer: the trained BPE with Qwen's special tokens appended."""
    vocab, merges = train_bpe()
    specials = list(QWEN_SPECIAL_TOKENS)
    if template == "opencua":
        specials += OPENCUA_SPECIAL_TOKENS
    specials += TOOL_TOKENS
    # Giving the special tokens their ids here, rather than letting the wrapper append them,
    # pins their order to Qwen's (<|endoftext|> first) instead of the wrapper's internal order.
    for token in specials:
        vocab[token] = len(vocab)
    return wrap_tokenizer(vocab, merges, specials)


def _build_into(out: Path, template: str, seed: int) -> None:
    """Write the whole model into ``out`` (a fresh, private directory)."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _train_tokenizer(template)
    template_text = chat_template(template)
    tokenizer.chat_template = template_text

    def token_id(token: str) -> int:
        idx = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(idx, int) or tokenizer.convert_ids_to_tokens(idx) != token:
            raise RuntimeError(f"special token {token!r} did not get its own id")
        return idx

    ids = {tok: token_id(tok) for tok in QWEN_SPECIAL_TOKENS}
    n_tokens = len(tokenizer)
    vocab_size = -(-n_tokens // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "max_window_layers": 2,
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
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "out_hidden_size": TEXT_HIDDEN,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )

    # Seeding right before construction makes the random initialisation, and hence the saved
    # weights, a pure function of `seed`.
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out, safe_serialization=True)

    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template_text,
    )
    processor.save_pretrained(out)
    # Saving the tokenizer with its template as well means AutoTokenizer alone (which is what
    # vLLM's chat rendering uses) renders the same prompts as AutoProcessor.
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template_text, encoding="utf-8")

    (out / MARKER_FILE).write_text(
        json.dumps(_marker(template, seed), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def build_tiny_model(
    out_dir: str | Path, *, template: str = "qwen", seed: int = 0, force: bool = False
) -> Path:
    """Build the tiny model into ``out_dir`` unless a finished one is already there.

    The model is written into a temporary directory beside ``out_dir`` and renamed into place,
    so a reader never sees a half-built directory. An existing complete model is left alone
    (building takes seconds, but tests call this from many places); ``force`` rebuilds it.
    A non-empty directory that is not a complete model is refused without ``force``, because
    it is more likely someone else's data than an interrupted build of ours.

    Returns the resolved path of the model directory.
    """
    _check_template(template)
    out = Path(out_dir).expanduser().resolve()
    marker = _marker(template, seed)

    if out.exists() and not force:
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        marker_path = out / MARKER_FILE
        found = (
            json.loads(marker_path.read_text(encoding="utf-8")) if marker_path.is_file() else None
        )
        stale = found is not None and found.get("format") != _MARKER_FORMAT
        if is_complete(out) and not stale:
            if found is not None and found != marker:
                raise FileExistsError(
                    f"{out} holds a tiny model built with template="
                    f"{found.get('template')!r}, seed={found.get('seed')!r} (asked for "
                    f"template={template!r}, seed={seed!r}); pass force=True (--force) "
                    "to rebuild it"
                )
            return out
        if any(out.iterdir()) and not stale:
            raise FileExistsError(
                f"{out} is not empty and not a complete model; pass force=True (--force) "
                "to replace it"
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _build_into(tmp, template, seed)
        # mkdtemp makes the directory 0700 and some writers create 0600 files; a model shared
        # between users (or mounted into a container) must be world-readable.
        os.chmod(tmp, 0o755)
        for child in tmp.iterdir():
            os.chmod(child, 0o644)
        if out.exists() or out.is_symlink():
            # rename() cannot replace a non-empty directory, so move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "model")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.tiny_model",
        description="Build a tiny random-weight Qwen2.5-VL model for tests and demos.",
    )
    parser.add_argument("dir", type=Path, help="directory to create the model in")
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default="qwen",
        help="chat template: Qwen2.5-VL image markers, or OpenCUA's media markers",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if DIR already holds a model"
    )
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard progress bar is only noise in build logs

    existed = is_complete(args.dir)
    try:
        path = build_tiny_model(args.dir, template=args.template, seed=args.seed, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    action = "kept existing" if existed and not args.force else "built"
    print(f"{action} tiny model ({args.template}) at {path}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
