"""What every tiny family build shares: tokenizers, sizes, saving, and the atomic install.

Each family module only has to say what is particular to its architecture (config, special
tokens, chat template, processor). Everything that makes a build trustworthy for tests (a
seeded, byte-for-byte reproducible directory that appears only when finished and records that
its weights are random) lives here once, following ``tools/tiny_model.py``'s conventions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tools.tiny_model import MARKER_FILE, REQUIRED_FILES, is_complete, train_bpe

__all__ = [
    "MARKER_FILE",
    "REQUIRED_FILES",
    "TEXT_HIDDEN",
    "TEXT_LAYERS",
    "VOCAB_PAD_MULTIPLE",
    "byte_level_tokenizer",
    "check_ids",
    "install",
    "is_complete",
    "padded_vocab",
    "rename_weights",
    "save_model",
    "save_processor",
    "sentencepiece_vocab",
]

#: Bumped whenever any family's output changes, so a directory left by an older builder is
#: rebuilt rather than served.
MARKER_FORMAT = 1

# The text decoder every family shares: vLLM's CPU attention rejects head_dim 16, so two heads of
# 64 make up the 128-wide stream; one KV head keeps grouped-query attention in play.
TEXT_HIDDEN = 128
TEXT_LAYERS = 2
TEXT_HEADS = 2
TEXT_KV_HEADS = 1
HEAD_DIM = 64
TEXT_MLP = 256
VOCAB_PAD_MULTIPLE = 64


def padded_vocab(n_tokens: int) -> int:
    """Embedding rows for ``n_tokens``, rounded up as real checkpoints pad their vocabularies.

    Padding means ids exist that the tokenizer never produces, which is the normal situation a
    worker must cope with (a sampled id beyond ``len(tokenizer)``).
    """
    return -(-n_tokens // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def byte_level_tokenizer(
    *,
    leading: Iterable[str] = (),
    trailing: Iterable[str] = (),
    tokenizer_class: Callable[..., Any] | None = None,
    **special: Any,
) -> Any:
    """A byte-level BPE (GPT-2/tiktoken style) with special tokens placed where the family puts them.

    ``leading`` tokens take the first ids (as Mistral's tekken puts its control tokens at 0..N),
    ``trailing`` ones follow the learned vocabulary (as Llama 3 and Qwen append theirs). Placing
    them explicitly, rather than letting the wrapper append them, keeps their relative order the
    family's. ``special`` names the roles (bos_token, eos_token, ...) for the wrapper.
    """
    from transformers import PreTrainedTokenizerFast

    learned, merges = train_bpe()
    lead = list(leading)
    vocab = {tok: i for i, tok in enumerate(lead)}
    for tok, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab[tok] = len(vocab)
    for tok in trailing:
        vocab[tok] = len(vocab)
    specials = [*lead, *trailing]
    return _wrap(
        tokenizer_class or PreTrainedTokenizerFast,
        _byte_level_backend(vocab, merges, specials),
        specials,
        special,
    )


def _byte_level_backend(vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]):
    """The ``tokenizers`` object for a byte-level BPE, split with the Qwen/Llama 3 regex."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def sentencepiece_vocab(
    leading: Iterable[str], trailing: Iterable[str] = (), *, newline_runs: int = 0
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A SentencePiece-style BPE vocabulary: ``▁`` for spaces, ``<0xNN>`` byte fallback pieces.

    Llama 2 (LLaVA 1.5) and Gemma tokenizers are of this kind, and their transformers classes
    build their own pipeline from (vocab, merges); this supplies those in the real layout:
    control tokens first, then the 256 byte pieces, then the learned pieces, then ``trailing``
    (tokens the multimodal checkpoints appended after the base vocabulary).

    ``newline_runs`` (at most 4) adds ordinary pieces for runs of 1..N newlines after ``leading``, with
    merges ranked first so such runs always encode as one token: Gemma's vocabulary has them,
    and vLLM's Gemma 3 processor looks them up by text to re-split ``\n\n`` around images.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from tools.tiny_model import _CORPUS

    bpe = Tokenizer(models.BPE(byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=1, show_progress=False, special_tokens=[]
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    state = json.loads(bpe.to_str())
    learned: dict[str, int] = state["model"]["vocab"]
    merges = [tuple(m.split(" ", 1) if isinstance(m, str) else m) for m in state["model"]["merges"]]

    if not 0 <= newline_runs <= 4:
        raise ValueError("newline_runs must be between 0 and 4")
    runs = ["\n" * k for k in range(1, newline_runs + 1)]
    vocab: dict[str, int] = {}
    for tok in [*leading, *runs, *(f"<0x{b:02X}>" for b in range(256))]:
        vocab[tok] = len(vocab)
    # BPE merges the lowest-ranked pair first: 1+1 -> 2, then 2+1 -> 3, then 2+2 -> 4.
    run_merges = [("\n", "\n"), ("\n\n", "\n"), ("\n\n", "\n\n")][: max(newline_runs - 1, 0)]
    merges = run_merges + [m for m in merges if "\n" not in m[0] + m[1]]
    for tok, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    for tok in trailing:
        vocab[tok] = len(vocab)
    return vocab, merges  # type: ignore[return-value]


def _wrap(cls: Callable[..., Any], backend: Any, specials: list[str], roles: Mapping[str, Any]):
    named = {k: v for k, v in roles.items() if k.endswith("_token")}
    rest = {k: v for k, v in roles.items() if not k.endswith("_token")}
    extra = rest.pop("extra_special_tokens", None)
    if extra is None:
        extra = [t for t in specials if t not in named.values()]
    return cls(
        tokenizer_object=backend,
        extra_special_tokens=extra,
        clean_up_tokenization_spaces=False,
        **named,
        **rest,
    )


def check_ids(tokenizer: Any, tokens: Iterable[str]) -> dict[str, int]:
    """Register ``tokens`` as special and return their ids, failing loudly if one is split.

    Tokens already in the vocabulary keep their ids. A special token that tokenizes into pieces
    would make the config's image/video token ids point at nothing, and vLLM would then find no
    placeholders in any prompt.
    """
    from tokenizers import AddedToken

    tokens = list(tokens)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True
    )
    ids = {}
    for token in tokens:
        idx = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(idx, int) or tokenizer.convert_ids_to_tokens(idx) != token:
            raise RuntimeError(f"special token {token!r} did not get its own id")
        if tokenizer.encode(token, add_special_tokens=False) != [idx]:
            raise RuntimeError(f"special token {token!r} is split when it appears in text")
        ids[token] = idx
    return ids


def save_model(model_cls: Any, config: Any, generation: Mapping[str, Any], out: Path, seed: int):
    """Instantiate ``model_cls`` from ``config`` with seeded random weights and save it in bf16.

    Seeding right before construction makes the weights a pure function of ``seed``.
    """
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(out, safe_serialization=True)


def rename_weights(out: Path, rename: Callable[[str], str]) -> None:
    """Rewrite ``model.safetensors`` with renamed tensors, to match a released checkpoint's layout.

    transformers 5 converts legacy layouts on load and does not always convert them back on save;
    vLLM loads by the released names, so a family whose saved names drift is renamed here.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out / "model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    save_file(dict(sorted(tensors.items())), path, metadata=metadata)


def save_processor(processor: Any, tokenizer: Any, template: str, out: Path) -> None:
    """Save processor, tokenizer and template so every loader sees the same chat template.

    vLLM renders chat prompts with the tokenizer alone, transformers users with the processor;
    both must find the family's template, and ``chat_template.jinja`` is where both look first.
    """
    processor.save_pretrained(out)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def _marker(name: str, seed: int) -> dict[str, Any]:
    return {"format": MARKER_FORMAT, "family": name, "seed": seed, "random_weights": True}


def install(
    name: str, build_into: Callable[[Path, int], None], out_dir: str | Path, seed: int, force: bool
) -> Path:
    """Run ``build_into`` in a private directory and rename the result to ``out_dir``.

    A reader never sees a half-built directory; an existing complete build with the same marker
    is kept (tests call this from many places); a different or foreign non-empty directory is
    refused unless ``force``, because it is more likely someone's data than an interrupted build.
    """
    out = Path(out_dir).expanduser().resolve()
    marker = _marker(name, seed)
    if out.exists() and not force:
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        marker_path = out / MARKER_FILE
        found = (
            json.loads(marker_path.read_text(encoding="utf-8")) if marker_path.is_file() else None
        )
        stale = (
            found is not None
            and found.get("family") == name
            and found.get("format") != MARKER_FORMAT
        )
        if is_complete(out) and not stale:
            if found != marker:
                raise FileExistsError(
                    f"{out} holds {found!r}, not the tiny {name} (seed {seed}); pass force=True "
                    "(--force) to rebuild it"
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
        build_into(tmp, seed)
        missing = [f for f in REQUIRED_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"tiny {name} build wrote no {', '.join(missing)}")
        (tmp / MARKER_FILE).write_text(
            json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        # mkdtemp makes the directory 0700; a model shared between users (or mounted into a
        # container) must be world-readable.
        os.chmod(tmp, 0o755)
        for child in tmp.iterdir():
            os.chmod(child, 0o644)
        if out.exists() or out.is_symlink():
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
