"""The prompt encoder: same ids as the tokenizer, without going through vLLM's pool."""

from __future__ import annotations

import copy
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlm_worker.engine.model_info import _probe_prompt, text_encoder


@pytest.fixture(scope="module")
def tokenizer(processor):
    return processor.tokenizer


@pytest.fixture(scope="module")
def encoder(tokenizer, processor):
    enc = text_encoder(tokenizer, _probe_prompt(processor, "<|image_pad|>"))
    assert enc is not None
    return enc


def reference(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def test_probe_is_a_rendered_prompt_with_special_tokens(processor):
    probe = _probe_prompt(processor, "<|image_pad|>")
    assert "<|im_start|>" in probe and "<|image_pad|>" in probe and "\u4fdd\u5b58" in probe


SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS)), max_size=8))
def test_same_ids_as_the_tokenizer_for_any_text(tokenizer, encoder, pieces):
    text = "".join(pieces)
    assert encoder(text) == reference(tokenizer, text)


def test_a_whole_chat_prompt(tokenizer, encoder, processor):
    text = processor.apply_chat_template(
        [
            {"role": "system", "content": [{"type": "text", "text": "You are a GUI agent."}]},
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "Where is  \u201cOK\u201d?\n\t"},
                ],
            },
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert encoder(text) == reference(tokenizer, text)


def test_never_goes_through_vllms_tokenizer_pool(tokenizer, processor):
    """vLLM's pool deep-copies the tokenizer for every extra concurrent caller (100-300 ms
    under the GIL for a 150k vocabulary); our threads must not reach it at all."""
    from vllm.tokenizers.hf import maybe_make_thread_pool

    pooled = maybe_make_thread_pool(copy.copy(tokenizer))
    enc = text_encoder(pooled, _probe_prompt(processor, "<|image_pad|>"))
    assert enc is not None

    def refuse(*args, **kwargs):
        raise AssertionError("the pool's encode was called")

    pooled.encode = refuse
    copies = []
    real_deepcopy = copy.deepcopy

    def counting(obj, *args, **kwargs):
        if "Tokenizer" in type(obj).__name__:
            copies.append(type(obj).__name__)
        return real_deepcopy(obj, *args, **kwargs)

    expected = reference(tokenizer, "<|im_start|>user\nclick OK<|im_end|>")
    results, barrier = [], threading.Barrier(16)

    def work() -> None:
        barrier.wait()
        for _ in range(50):
            results.append(enc("<|im_start|>user\nclick OK<|im_end|>"))

    copy.deepcopy = counting
    try:
        threads = [threading.Thread(target=work) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        copy.deepcopy = real_deepcopy
    assert copies == []
    assert len(results) == 800 and all(r == expected for r in results)


class _Disagrees:
    """A transformers-like tokenizer whose class adds processing its backend does not."""

    def __init__(self, tokenizer) -> None:
        self.backend_tokenizer = tokenizer.backend_tokenizer
        self._tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(" " + text, add_special_tokens=add_special_tokens)


def test_falls_back_when_the_backend_disagrees(tokenizer, caplog):
    assert text_encoder(_Disagrees(tokenizer), "<|im_start|>user\nhi<|im_end|>") is None
    assert "tokenized through vLLM's tokenizer pool" in caplog.text


def test_no_backend_no_encoder():
    class Slow:
        def encode(self, text, add_special_tokens=True):
            return [1, 2]

    assert text_encoder(Slow(), "hi") is None


def test_the_opencua_tokenizer_too(tmp_path):
    from tools.tiny_model import build_tiny_model

    from vlm_worker.engine.model_info import load_processor

    processor = load_processor(
        str(build_tiny_model(tmp_path / "opencua", template="opencua")), None, False
    )
    tok = processor.tokenizer
    probe = _probe_prompt(processor, "<|media_pad|>")
    enc = text_encoder(tok, probe)
    assert enc is not None
    for text in (probe, "plain words", "\u4fdd\u5b58 \U0001f642\n\n  x"):
        assert enc(text) == reference(tok, text)


def test_a_million_characters_are_tokenized_without_holding_the_gil(tokenizer, encoder):
    """A sleeper thread beside the encoder: ``Tokenizer.encode`` held the GIL for the whole
    text (about 0.7 s on this machine: every stream stalled that long); the encoder the
    worker uses lets other threads run, only the list of ids is built under the GIL."""
    import threading
    import time

    text = "hello world, the quick brown fox " * 30_000
    gaps: list[float] = []
    stop = threading.Event()

    def sleeper() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=sleeper)
    thread.start()
    time.sleep(0.02)
    ids = encoder(text)
    stop.set()
    thread.join()
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert max(gaps) < 0.25, f"a thread waited {max(gaps) * 1000:.0f} ms for the GIL"
