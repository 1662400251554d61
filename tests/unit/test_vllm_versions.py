"""The vLLM adapter's version keying: each moved name is picked by the installed release."""

from __future__ import annotations

import pytest

from vlm_worker.adapters import vllm as adapter


def test_release_numbers():
    assert adapter._numbers("0.32.0+cpu") == (0, 32, 0)
    assert adapter._numbers("0.11.2.post2") == (0, 11, 2)
    assert adapter._numbers("0.27.0rc1") == (0, 27, 0)
    assert adapter.vllm_version()[:2] in {(0, 26), (0, 32)}  # what the suites install


@pytest.mark.parametrize(
    ("release", "keeps_length", "flags"),
    [
        ((0, 26, 0), False, []),
        ((0, 27, 1), False, []),
        ((0, 31, 0), True, ["--trust-request-mm-kwargs"]),
        ((0, 32, 0), True, ["--trust-request-mm-kwargs"]),
    ],
)
def test_each_behaviour_follows_the_release(monkeypatch, release, keeps_length, flags):
    monkeypatch.setattr(adapter, "vllm_version", lambda: release)
    assert adapter.streamed_tool_call_keeps_length() is keeps_length
    assert adapter.serve_mm_kwargs_flags() == flags
    if release < (0, 27):  # (0.27+ imports a class that 0.26 does not have)
        assert adapter.request_error_types() == (ValueError,)


def test_the_installed_releases_validation_error_is_caught():
    """On either suite's vLLM, the error vLLM raises for a refused parameter is one the
    worker treats as a refused request (0.26: a ValueError; 0.27+: a VLLMClientError)."""
    from vllm.exceptions import VLLMValidationError

    exc = VLLMValidationError("bad", parameter="logprobs")
    assert isinstance(exc, adapter.request_error_types())
    assert adapter.validation_parameter(exc) == "logprobs"


def test_stream_finish_reason_as_the_installed_server(monkeypatch):
    from vlm_worker.serving.tool_calls import ToolCalls

    calls = ToolCalls.__new__(ToolCalls)
    calls.named, calls._streamed = False, {0}
    for release, cut_short in (((0, 26, 0), "tool_calls"), ((0, 32, 0), "length")):
        monkeypatch.setattr(adapter, "vllm_version", lambda r=release: r)
        assert calls.stream_finish_reason(0, "stop") == "tool_calls"
        assert calls.stream_finish_reason(0, "length") == cut_short
    calls.named = True
    assert calls.stream_finish_reason(0, "stop") == "stop"


def test_the_engine_starts_in_vllm_serves_usage_context(monkeypatch, tiny_model):
    """vLLM sizes its batch by usage context; the library default would give a large GPU a
    quarter of `vllm serve`'s prefill batch."""
    import vllm
    from vllm.usage.usage_lib import UsageContext

    from vlm_worker.engine.vllm_engine import VllmEngine

    seen = {}

    def from_engine_args(args, usage_context=None, **_):
        seen["context"] = usage_context
        raise RuntimeError("stop here")

    monkeypatch.setattr(vllm.AsyncLLMEngine, "from_engine_args", from_engine_args)
    with pytest.raises(RuntimeError, match="stop here"):
        VllmEngine.start({"model": tiny_model}, lambda llm: None)
    assert seen["context"] == UsageContext.OPENAI_API_SERVER
