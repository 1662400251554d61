"""The benchmark's support pieces: the 7B-shaped model folder and the results files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from benchmarks.bench import markdown, pooled, pooled_markdown, screenshot_png
from tools.shaped_model import build_shaped_model

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_shaped_model_has_real_dimensions_and_token_ids(tmp_path):
    from transformers import AutoConfig, AutoProcessor

    out = build_shaped_model(tmp_path / "q7b")
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (3584, 28)
    assert config.vision_config.depth == 32 and config.image_token_id == 151655
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    assert len(tokenizer) == 152064
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    # every id a random model can sample decodes
    assert tokenizer.decode([0, 151700, 152063])


def test_committed_results_render_and_hold_the_measurements():
    files = sorted(f for f in RESULTS.glob("*.json") if not f.name.endswith(".partial.json"))
    assert {f.stem.split("-")[-1] for f in files} >= {"cpu", "gpu"}
    full = 0
    for f in files:
        results = json.loads(f.read_text())
        assert [r["concurrency"] for r in results["throughput"]] == [1, 8, 32]
        table = markdown(results)
        assert "| 32 |" in table and results["device"] in table
        if "preprocessing" not in results:  # an --only-throughput run: no plot
            continue
        full += 1
        assert all(p["resized_pixels_identical_to_processor"] for p in results["preprocessing"])
        assert "| 3840x2160 PNG" in table
        assert f.with_suffix(".png").exists()
    assert full >= 2


def test_committed_paired_ratios_follow_from_the_runs_they_pair():
    """The paired and pace-free ratios are recomputable from each file's own runs, and
    the targets say what those numbers say."""
    checked = 0
    for f in RESULTS.glob("*.json"):
        results = json.loads(f.read_text())
        gaps = results.get("stream_gaps", {})
        if "ratio_paired_median" not in gaps:  # files from before these were measured
            continue
        checked += 1
        runs = gaps["all_runs_ms"]
        assert len(runs["alone"]) == len(runs["preprocessing"]) == gaps["reps"]
        paired = statistics.median(
            p / a for a, p in zip(runs["alone"], runs["preprocessing"], strict=True)
        )
        assert gaps["ratio_paired_median"] == pytest.approx(paired, abs=0.005)
        assert gaps["ratio"] == pytest.approx(
            statistics.median(runs["preprocessing"]) / statistics.median(runs["alone"]), abs=0.005
        )
        assert results["targets"]["stream_gap_paired_ratio_le_1.2"] == (
            gaps["ratio_paired_median"] <= 1.2
        )
        for row in results["preprocessing"]:
            handler, bare = zip(*row["e2e_pairs_ms"], strict=True)
            assert row["e2e_prefixed_resize_ms"] == pytest.approx(
                statistics.median(handler), abs=0.1
            )
            assert row["e2e_full_size_to_vllm_ms"] == pytest.approx(
                statistics.median(bare), abs=0.1
            )
            ratio = statistics.median(h / b for h, b in row["e2e_pairs_ms"])
            assert row["e2e_ratio_paired_median"] == pytest.approx(ratio, abs=0.005)
        four_k = results["preprocessing"][0]
        assert results["targets"]["prefixed_resize_faster_for_4k_single_paired"] == (
            four_k["e2e_ratio_paired_median"] < 1.0
        )
    assert checked >= 3  # the CPU run and the two H100 runs


def run_of(pairs: list[tuple[float, float, float, float]], concurrency: int = 8) -> dict:
    """A results file's throughput section: (handler tok/s, bare tok/s, handler TTFT p50,
    bare TTFT p50) per round pair."""
    return {
        "throughput": [
            {
                "concurrency": concurrency,
                "all_runs": {
                    "handler": [{"tokens_per_s": h, "ttft_p50_ms": ht} for h, _, ht, _ in pairs],
                    "bare": [{"tokens_per_s": b, "ttft_p50_ms": bt} for _, b, _, bt in pairs],
                },
            }
        ]
    }


def test_pooled_intervals_say_met_missed_or_cannot_tell():
    steady = [(1000.0 + i, 1000.0, 300.0 + i % 2, 300.0) for i in range(8)]
    (met,) = pooled([run_of(steady)])
    assert met["pairs"] == 8 and met["tokens_per_s_target"] == "met"
    assert met["added_ttft_target"] == "met"
    low, high = met["tokens_per_s_ratio_ci95"]
    assert low <= met["tokens_per_s_ratio"] <= high and low >= 0.98

    slow = [(900.0 + i, 1000.0, 340.0 + i, 300.0) for i in range(8)]
    (missed,) = pooled([run_of(slow)])
    assert missed["tokens_per_s_target"] == "missed" and missed["added_ttft_target"] == "missed"
    assert missed["added_ttft_p50_ms"] == pytest.approx(43.5)

    noisy = [
        (1000.0 * (1.1 if i % 2 else 0.9), 1000.0, 300.0 + (60 if i % 2 else -60), 300.0)
        for i in range(8)
    ]
    (unsure,) = pooled([run_of(noisy)])
    assert unsure["tokens_per_s_target"] == unsure["added_ttft_target"] == "unresolved"


def test_pooling_runs_narrows_the_interval_and_few_pairs_give_no_verdict():
    import numpy as np

    rng = np.random.default_rng(1)
    runs = [
        run_of([(1000.0 * rng.normal(1.0, 0.05), 1000.0, 300.0, 300.0) for _ in range(4)])
        for _ in range(4)
    ]
    (one,) = pooled(runs[:1])
    (four,) = pooled(runs)
    assert one["tokens_per_s_target"] == "too few pairs" and four["pairs"] == 16

    def width(p: dict) -> float:
        return p["tokens_per_s_ratio_ci95"][1] - p["tokens_per_s_ratio_ci95"][0]

    assert width(four) < width(one)
    assert pooled(runs) == pooled(runs)  # a fixed seed: reruns agree


def test_committed_gpu_runs_pool_into_a_table():
    files = sorted(RESULTS.glob("2026-11-29-gpu-[bc]-*.json"))
    assert len(files) == 4
    table = pooled_markdown([json.loads(f.read_text()) for f in files], [f.stem for f in files])
    assert table.count("| 16 |") == 3  # 4 rounds x 4 runs at each concurrency


def test_screenshot_like_png_is_realistically_large():
    assert len(screenshot_png(3840, 2160, 1)) > 3_000_000


def test_preprocess_trace_splits_a_rounds_time(processor):
    """--trace-preprocess: through the hooks the job path calls, the image work is timed
    where it runs, the prompt's rendering beside it, and tracing stops on close."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.bench import BenchHooks, PreprocessTrace, data_uri

    from support.fakes import ScriptedEngine, answer_script, scripted_info
    from support.jobs import image_job
    from vlm_worker.config.settings import load_worker_settings
    from vlm_worker.pipeline.runner import JobRunner

    hooks = BenchHooks()
    hooks.trace = PreprocessTrace()
    engine = ScriptedEngine(scripted_info(processor), answer_script("ok"))
    runner = JobRunner(
        engine, load_worker_settings({}), executor=ThreadPoolExecutor(2), hooks=hooks
    )
    uri = data_uri(screenshot_png(640, 360, 3))

    async def job(n: int) -> None:
        chunks = [c async for c in runner.run({"id": f"j{n}", "input": image_job(uri)})]
        assert "error" not in chunks[-1]

    async def rounds() -> None:
        await job(0)  # alone: the worker prepares it in a thread, untraced
        await asyncio.gather(job(1), job(2))

    asyncio.run(rounds())
    summary = hooks.trace.summary()
    assert summary["images_traced"] == 2 and summary["images_alone"] == 1
    assert summary["workers_used"] == 1  # threads: this process
    assert 0 < summary["work_ms"]["p50"] < 5000 and summary["to_worker_ms"]["p50"] >= 0
    assert len(hooks.trace.renders) == 0  # summary() starts the next round
    assert summary["render_ms"]["max"] > 0 and len(summary["gc_collections"]) == 3
    assert hooks.trace.summary()["images_traced"] == 0
    assert hooks.image_function() is not None
    hooks.trace.close()
    hooks.trace = None
    assert hooks.image_function() is None


# ---------------------------------------------------------------- the agent workload
def _burst(path: str, rnd: int, jobs_per_s: float, shape: str = "1920x1080", c: int = 8) -> dict:
    return {
        "path": path, "round": rnd, "shape": shape, "concurrency": c, "jobs_per_s": jobs_per_s,
        "p50_ms": 1.0, "p95_ms": 1.0, "ttft_p50_ms": None, "prompt_tokens": 2741.0,
        "gpu_busy": 0.9, "errors": [],
    }  # fmt: skip


def test_agent_ratios_pair_each_round_with_the_same_rounds_serve_burst():
    from benchmarks.agent_workload import first_rounds, pooled, summary_table

    bursts = [
        _burst("serve", -1, 5.0),
        _burst("native", -1, 6.0),
        *(_burst("serve", r, v) for r, v in enumerate([4.0, 8.0, 6.0])),
        *(_burst("native", r, v) for r, v in enumerate([4.4, 8.8, 6.6])),
        {**_burst("openai", 0, 99.0), "errors": ["an error"]},  # never pooled
    ]
    (row,) = pooled(bursts)
    # per-round ratios are all 1.1, though the rounds themselves spread 2x
    assert row["path"] == "native" and row["rounds"] == 3
    assert row["jobs_per_s_ratio"] == pytest.approx(1.1, abs=1e-3)
    assert row["ci95"][0] == pytest.approx(1.1, abs=1e-3)
    first = {f["path"]: f for f in first_rounds(bursts)}
    assert first["native"]["ratio"] == pytest.approx(6.0 / 6.6, abs=1e-3)
    assert first["serve"]["within_10_percent"] is False  # 5.0 against a median of 6.0
    table = summary_table(bursts)
    assert "| 1920x1080 | 8 | native | 6.6 |" in table and "99" not in table


def test_agent_change_against_its_base_tree_pairs_with_the_base_path():
    """``--base DIR``: the ratio is the worker's to the base worker's, round by round."""
    from benchmarks.agent_workload import pooled, summary_table

    bursts = [
        *(_burst("base", r, v) for r, v in enumerate([5.0, 7.0, 6.0])),
        *(_burst("native", r, v) for r, v in enumerate([4.5, 6.3, 5.4])),
    ]
    assert pooled(bursts) == []  # no serve burst to pair with
    (row,) = pooled(bursts, "base")
    assert row["path"] == "native" and row["jobs_per_s_ratio"] == pytest.approx(0.9, abs=1e-3)
    table = summary_table(bursts, "base")
    assert "ratio to base" in table and "| 1920x1080 | 8 | base | 6 |" in table


def test_agent_shapes_and_the_serve_command_line():
    from benchmarks.agent_workload import Shape, chat_body, native_job, vllm_cli_args

    shape = Shape.parse("3840x2160@2000000")
    assert (shape.width, shape.height, shape.max_pixels, shape.label) == (
        3840, 2160, 2000000, "3840x2160@2MP"
    )  # fmt: skip
    assert Shape.parse("1920x1080").label == "1920x1080"
    job = native_job("data:x", shape, 32)["input"]
    body = chat_body("data:x", shape, 32, "m", stream=True)
    assert job["mm_processor_kwargs"] == body["mm_processor_kwargs"] == {"max_pixels": 2000000}
    assert job["ignore_eos"] and body["ignore_eos"] and body["stream_options"]["include_usage"]
    args = vllm_cli_args(
        {"model": "/m", "enforce_eager": True, "enable_prefix_caching": False,
         "limit_mm_per_prompt": {"image": 4}, "max_model_len": 16384, "revision": None}
    )  # fmt: skip
    assert args[:2] == ["--model", "/m"]
    assert "--enforce-eager" in args and "--no-enable-prefix-caching" in args
    assert args[args.index("--limit-mm-per-prompt") + 1] == '{"image": 4}'
    assert "--revision" not in args


def test_agent_profile_categories(tmp_path):
    from benchmarks.agent_workload import categorize

    raw = tmp_path / "p.txt"
    raw.write_text(
        "process 1;run (vlm_worker/pipeline/runner.py:1);png_pixels (vlm_worker/media/images.py:3) 6\n"
        "process 1;f (vllm/v1/engine/async_llm.py:1);normalize (transformers/x.py:2) 3\n"
        "process 1;serve (uvicorn/server.py:1) 1\n"
    )
    shares = categorize(raw)["share_of_cpu_samples"]
    assert shares == {
        "the worker (vlm_worker)": 0.6,
        "transformers processor": 0.3,
        "runpod SDK / HTTP": 0.1,
    }


def test_committed_agent_runs_pool_to_the_ratios_they_hold():
    """Each committed agent-workload file's ratios follow from its own bursts (against
    `vllm serve`, or the base worker of an A/B run), and its first bursts from its rounds."""
    from benchmarks.agent_workload import first_rounds, pooled

    files = sorted((RESULTS / "agent").glob("2026-*.json"))
    assert len(files) >= 6
    for f in files:
        result = json.loads(f.read_text())
        against = result.get("against", "serve")
        assert pooled(result["bursts"], against) == result["pooled"], f.name
        assert first_rounds(result["bursts"]) == result["first_round"], f.name
    kwargs = json.loads((RESULTS / "agent" / "2026-12-01-h200-kwargs-ab.json").read_text())
    first = {(r["path"], r["shape"]): r["ratio"] for r in kwargs["first_round"]}
    assert first[("native", "3840x2160@2MP")] == 0.873 and first[("base", "3840x2160@2MP")] == 0.57


def test_parallel_configs_compare_unpaired_rounds_to_one_gpu():
    from benchmarks.parallel_gpus import CONFIGS, table, unpaired_ratio

    assert CONFIGS["dp2"][0] == {"DATA_PARALLEL_SIZE": "2"} and CONFIGS["one"][1] == [0]
    ratio, low, high = unpaired_ratio([4.0, 4.2, 3.8], [2.0, 2.1, 1.9])
    assert ratio == pytest.approx(2.0, abs=0.01) and low < ratio < high
    assert high / low < 1.2  # rounds this close give a narrow interval
    bursts = [
        {**_burst("native", r, v), "config": cfg}
        for cfg, values in (("one", [4.0, 4.4, 4.2]), ("dp2", [7.6, 7.9, 8.1]), ("tp2", [4.1]))
        for r, v in enumerate(values)
    ]
    bursts.append({**_burst("native", -1, 1.0), "config": "dp2"})  # a first burst: apart
    rows = {r["config"]: r for r in table(bursts)}
    assert rows["one"]["jobs_per_s"] == 4.2 and "ratio" not in rows["one"]
    assert rows["dp2"]["rounds"] == 3 and rows["dp2"]["ratio"] == pytest.approx(1.88, abs=0.01)
    assert rows["dp2"]["dp_target_met"] is (rows["dp2"]["ci95"][0] >= 1.8)
    assert "dp_target_met" not in rows["tp2"]


def test_committed_queue_runs_hold_the_table_their_rounds_give():
    """The MAX_CONCURRENCY runs behind a job queue: each file's table follows from its
    rounds, and the figures record 0011 quotes are those."""
    from benchmarks.queue_concurrency import round_stats, table

    files = sorted((RESULTS / "queue").glob("2026-*.json"))
    assert len(files) == 2
    cells = {}
    for f in files:
        result = json.loads(f.read_text())
        assert table(result["rounds"], result["against"]) == result["table"], f.name
        assert all(not r["errors"] and r["jobs"] in (32, 128) for r in result["rounds"])
        for row in result["table"]:
            cells[(f.stem.removeprefix("2026-12-01-h200-"), row["tree"], row["concurrency"])] = row
    assert cells[("ids-only", "worker", 32)]["ratio"] == 1.381
    assert cells[("ids-only", "worker", 16)]["to_base"] == 1.116
    assert cells[("before-ids-only", "worker", 64)]["jobs_per_s"] == 4.654

    # the ratios across the two leases that docs/benchmarks.md and record 0011 quote
    from benchmarks.parallel_gpus import unpaired_ratio

    runs = {f.stem.removeprefix("2026-12-01-h200-"): json.loads(f.read_text()) for f in files}

    def rates(run: str, tree: str, c: int) -> list[float]:
        return [r["jobs_per_s"] for r in runs[run]["rounds"]
                if r["round"] >= 0 and (r.get("tree", "worker"), r["concurrency"]) == (tree, c)]  # fmt: skip

    def across(new: tuple[str, int], old: tuple[str, int]) -> list[float]:
        ratio = unpaired_ratio(rates("ids-only", *new), rates("before-ids-only", "worker", old[1]))
        return [round(x, 3) for x in ratio]

    assert across(("worker", 16), ("worker", 16))[0] == 1.114
    assert across(("worker", 32), ("worker", 32)) == [1.367, 1.332, 1.403]
    assert across(("worker", 64), ("worker", 64)) == [1.585, 1.554, 1.617]
    assert across(("worker", 32), ("worker", 16)) == [1.537, 1.519, 1.556]
    assert across(("base", 16), ("worker", 16)) == [0.998, 0.985, 1.011]

    # the per-round numbers: wall clock from the first queueing to the last result
    from benchmarks.runpod_queue import QueuedJob

    jobs = [QueuedJob(f"j{i}", {}, 0.0, taken=i * 0.5, done=1.0 + i * 0.5) for i in range(4)]
    for j in jobs:
        j.result = {"output": [{"usage": {"completion_tokens": 32}}]}
    stats = round_stats(jobs, 32)
    assert stats["wall_s"] == 2.5 and stats["jobs_per_s"] == 1.6 and stats["errors"] == []
    assert stats["worker_p50_ms"] == 1000.0
    jobs[0].result = {"error": '{"type": "invalid_input"}'}
    assert len(round_stats(jobs, 32)["errors"]) == 1


def test_the_gpu_bundle_requirements_cover_every_runtime_dependency():
    """The GPU machines install nothing: a dependency the bundle lacks fails the worker's
    start there, after minutes of device time (aiodns did). Each of pyproject's runtime
    dependencies is pinned in the file or named as provided by the image or vLLM's bundle."""
    import re

    import tomllib

    root = RESULTS.parent.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    text = (root / "benchmarks" / "gpu-requirements.txt").read_text()
    provided = next(line for line in text.splitlines() if line.startswith("# provided-there:"))
    covered = {norm(n) for n in provided.split(":", 1)[1].split()}
    pinned = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", p) for p in pinned), pinned
    covered |= {norm(p.split("==")[0]) for p in pinned}
    missing = [d for d in deps if norm(re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0]) not in covered]
    assert not missing, f"add to benchmarks/gpu-requirements.txt: {missing}"
