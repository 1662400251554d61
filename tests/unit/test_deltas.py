"""Stream batching: exact batch sizes from a scripted delta source."""

from __future__ import annotations

from vlm_worker.engine.deltas import FINAL_ONLY, Batcher, BatchPolicy, Delta


async def batched(source, policy):
    """What the engine's loop does with each delta it receives."""
    batcher = Batcher(policy)
    async for delta in source:
        batch = batcher.add(delta)
        if batch is not None:
            yield batch
    rest = batcher.flush()
    if rest is not None:
        yield rest


async def deltas(n: int, per: int = 1):
    for i in range(n):
        yield Delta(
            text="x" * per,
            tokens=per,
            finished=i == n - 1,
            finish_reason="length" if i == n - 1 else None,
        )


async def sizes(source, policy):
    return [d.tokens async for d in batched(source, policy)]


async def test_batches_grow_geometrically_then_cap():
    assert await sizes(deltas(120), BatchPolicy(1, 50, 3.0)) == [1, 3, 9, 27, 50, 30]


async def test_growth_one_keeps_the_size():
    assert await sizes(deltas(10), BatchPolicy(4, 50, 1.0)) == [4, 4, 2]


async def test_multi_token_deltas_and_final_flush():
    out = [d async for d in batched(deltas(5, per=4), BatchPolicy(1, 50, 3.0))]
    assert [d.tokens for d in out] == [4, 4, 12]
    assert out[-1].finished and out[-1].finish_reason == "length"
    assert "".join(d.text for d in out) == "x" * 20


async def test_growth_is_at_least_one_token():
    assert await sizes(deltas(10), BatchPolicy(1, 3, 1.2)) == [1, 2, 3, 3, 1]


async def test_final_only_sends_one_batch():
    out = [d async for d in batched(deltas(40), FINAL_ONLY)]
    assert [d.tokens for d in out] == [40] and out[0].finished


async def test_no_policy_passes_every_delta():
    assert await sizes(deltas(5), None) == [1, 1, 1, 1, 1]


async def test_tokens_without_text_wait_for_the_one_that_completes_them():
    """A character split over several tokens decodes to "" until its last piece: those
    tokens join the next batch instead of making an empty one (the first visible text
    would otherwise wait for the grown second batch)."""

    async def source():
        for text in ["", "", "é", "a", "b", "c", "", "d"]:
            yield Delta(text=text, tokens=1)
        yield Delta(text="!", tokens=1, finished=True, finish_reason="stop")

    out = [(d.text, d.tokens) async for d in batched(source(), BatchPolicy(1, 50, 3.0))]
    assert out == [("é", 3), ("abc", 3), ("d!", 3)]


def test_logprobs_merge_in_token_order():
    a = Delta(text="a", tokens=1, logprobs=[{"token": "a"}])
    a.merge(Delta(text="b", tokens=1))
    a.merge(Delta(text="cd", tokens=2, logprobs=[{"token": "c"}, {"token": "d"}]))
    assert [e["token"] for e in a.logprobs] == ["a", "c", "d"]
    plain = Delta(text="x", tokens=1)
    plain.merge(Delta(text="y", tokens=1))
    assert plain.logprobs is None


def test_token_logprobs_keep_vllms_step_in_order_and_the_chat_route_cuts_it():
    from collections import namedtuple

    from vlm_worker.contract.openai_shapes import ChatFormatter
    from vlm_worker.engine.vllm_engine import token_logprobs

    lp = namedtuple("Logprob", "logprob rank decoded_token")
    # vLLM's per-step dict: the sampled token first (here rank 3), then the top two
    steps = [
        {7: lp(-1.5, 3, "é"), 3: lp(-0.5, 1, "a"), 8: lp(-1.0, 2, "x")},
        {9: lp(-float("inf"), 1, "z")},
        None,  # a prompt's first token: vLLM has no step for it
    ]
    out = token_logprobs([7, 9, 5], steps, decode=lambda token_id: f"<{token_id}>")
    assert out[0] == {
        "token": "é",
        "logprob": -1.5,
        "bytes": [195, 169],
        "top_logprobs": [
            {"token": "é", "logprob": -1.5, "bytes": [195, 169]},
            {"token": "a", "logprob": -0.5, "bytes": [97]},
            {"token": "x", "logprob": -1.0, "bytes": [120]},
        ],
    }
    assert out[1]["logprob"] == -9999.0 and out[1]["top_logprobs"][0]["logprob"] == -9999.0
    assert out[2] == {"token": "<5>", "logprob": None, "bytes": list(b"<5>"), "top_logprobs": None}
    # the chat route keeps the first top_logprobs entries, as vllm serve does
    (first, *_) = ChatFormatter("m", False, top_logprobs=2).logprobs(out)["content"]
    assert [t["token"] for t in first["top_logprobs"]] == ["é", "a"]
    assert ChatFormatter("m", False).logprobs(out)["content"][0]["top_logprobs"] == []
