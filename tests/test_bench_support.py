"""The benchmark's support pieces: the 7B-shaped model folder and the results files."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_worker.bench import markdown, screenshot_png
from vlm_worker.shaped_model import build_shaped_model

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


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
    for f in files:
        results = json.loads(f.read_text())
        assert [r["concurrency"] for r in results["throughput"]] == [1, 8, 32]
        assert all(p["resized_pixels_identical_to_processor"] for p in results["preprocessing"])
        table = markdown(results)
        assert "| 32 |" in table and results["device"] in table
        assert f.with_suffix(".png").exists()


def test_screenshot_like_png_is_realistically_large():
    assert len(screenshot_png(3840, 2160, 1)) > 3_000_000
