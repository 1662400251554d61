"""Every GPU of the worker used: one GPU, tensor parallel and data parallel engines compared
on the GUI-agent workload.

A model that fits in one GPU can use a second one in two ways: ``TENSOR_PARALLEL_SIZE=2``
splits every layer across both (each step waits for both, and for their all-reduce), and
``DATA_PARALLEL_SIZE=2`` runs two engine cores under one in-process ``AsyncLLM``, which
spreads requests over them (vLLM's own load balancing). Which one serves more screenshots
per second is an empirical question. So each configuration runs alone on the machine,
one after another, as the worker itself (``handler.py --rp_serve_api``, native jobs over
``/runsync``) with the same workload as ``benchmarks.agent_workload``: its first burst
after start, then rounds over the shapes and concurrencies.

The configurations cannot share the GPUs, so rounds cannot be paired as in
``agent_workload``. Each ratio to one GPU is the ratio of geometric means over rounds,
with a 95 % bootstrap interval that resamples each configuration's rounds on its own.

    python -m benchmarks.parallel_gpus --out DIR [--configs one,tp2,dp2]
        [--shapes 1920x1080] [--concurrency 32,64] [--rounds 3]
    python -m benchmarks.parallel_gpus --out DIR --combine A.json B.json   # runs split over calls

``MODE=parallel bash benchmarks/gpu_bench.sh`` sets the 7B shape and the GPU's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.agent_workload import (  # noqa: E402
    GpuBusy,
    Screenshots,
    Shape,
    burst,
    engine_kwargs,
    jobs_for,
    served_model,
    start_worker,
)
from benchmarks.bench import device_name  # noqa: E402

from vlm_worker.adapters.vllm import vllm_version  # noqa: E402

#: Each configuration's variables on top of the environment, and the GPUs it occupies.
CONFIGS: dict[str, tuple[dict[str, str], list[int]]] = {
    "one": ({"CUDA_VISIBLE_DEVICES": "0"}, [0]),
    "tp2": ({"TENSOR_PARALLEL_SIZE": "2"}, [0, 1]),
    "dp2": ({"DATA_PARALLEL_SIZE": "2"}, [0, 1]),
}
#: The issue's bar for data parallel engines on two GPUs, against one GPU.
DP_TARGET = 1.8


async def run_config(name: str, args: argparse.Namespace, out: Path) -> list[dict]:
    """One configuration's bursts: its first after start, then ``args.rounds`` rounds."""
    extra, gpus = CONFIGS[name]
    shapes = [Shape.parse(s) for s in args.shapes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    server = start_worker(out, ROOT, name, extra)
    images = Screenshots(args.image_workers)
    gpu = GpuBusy(gpus)
    rows: list[dict] = []
    try:
        model = (await served_model({"native": server.base}))["native"]
        plan = [(-1, shapes[0], args.first_concurrency)] if args.first_concurrency else []
        plan += [(r, s, c) for r in range(args.rounds) for s in shapes for c in levels]
        for rnd, shape, c in plan:
            uris = images.take(shape, jobs_for(c))
            b = await burst("native", server.base, shape, c, uris, args.max_tokens, model, gpu)
            rows.append(asdict(b) | {"round": rnd, "config": name, "start_s": server.started_s})
            # after every burst: a run cut short by a time limit keeps what it measured
            (out / f"partial-{name}.json").write_text(json.dumps({"bursts": rows}))
            tag = "first" if rnd < 0 else f"r{rnd}"
            print(f"{name} {tag} {shape.label} c={c}: {b.jobs_per_s} jobs/s p50 {b.p50_ms} ms "
                  f"busy {b.gpu_busy} errors {len(b.errors)}", flush=True)  # fmt: skip
    finally:
        images.close()
        server.stop()
    return rows


def unpaired_ratio(new: list[float], base: list[float]) -> tuple[float, float, float]:
    """Geometric-mean ratio ``new / base`` and its 95 % bootstrap interval, each side's
    rounds resampled on their own (the runs were not interleaved); a fixed seed."""
    a, b = np.log(np.asarray(new)), np.log(np.asarray(base))
    rng = np.random.default_rng(0)
    draws = rng.choice(a, (10_000, len(a))).mean(1) - rng.choice(b, (10_000, len(b))).mean(1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(np.exp(a.mean() - b.mean())), float(np.exp(low)), float(np.exp(high))


def table(bursts: list[dict], against: str = "one") -> list[dict]:
    """Per shape, concurrency and configuration: median jobs/s, p50 latency, GPU busy, and
    the ratio to ``against`` (with the data parallel target checked where it applies)."""
    rows = []
    good = [b for b in bursts if not b["errors"] and b["round"] >= 0]
    configs = sorted({b["config"] for b in good}, key=lambda c: (c != against, c))
    for shape, c in sorted({(b["shape"], b["concurrency"]) for b in good}):
        base = [b["jobs_per_s"] for b in good if (b["shape"], b["concurrency"], b["config"])
                == (shape, c, against)]  # fmt: skip
        for config in configs:
            cell = [b for b in good if (b["shape"], b["concurrency"], b["config"]) == (shape, c,
                    config)]  # fmt: skip
            if not cell:
                continue
            row: dict[str, Any] = {
                "shape": shape,
                "concurrency": c,
                "config": config,
                "rounds": len(cell),
                "jobs_per_s": round(float(np.median([b["jobs_per_s"] for b in cell])), 3),
                "p50_ms": round(float(np.median([b["p50_ms"] for b in cell])), 1),
                "gpu_busy": _median([b["gpu_busy"] for b in cell]),
            }
            if config != against and base:
                ratio, low, high = unpaired_ratio([b["jobs_per_s"] for b in cell], base)
                row |= {"ratio": round(ratio, 3), "ci95": [round(low, 3), round(high, 3)]}
                if config.startswith("dp"):
                    row["dp_target_met"] = low >= DP_TARGET
            rows.append(row)
    return rows


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.median(present)), 3) if present else None


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# One GPU, tensor parallel, data parallel: {result['device']}, vLLM {result['vllm']}",
        "",
        "| shape | conc. | config | rounds | jobs/s | p50 ms | GPU busy | ratio to one GPU (95 % CI) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for r in result["table"]:
        ratio = f"{r['ratio']:.3f} ({r['ci95'][0]:.3f} to {r['ci95'][1]:.3f})" if "ratio" in r \
            else "-"  # fmt: skip
        lines.append(
            f"| {r['shape']} | {r['concurrency']} | {r['config']} | {r['rounds']} | "
            f"{r['jobs_per_s']} | {r['p50_ms']} | {r['gpu_busy']} | {ratio} |"
        )
    lines += ["", "First burst after start, jobs/s:", ""]
    for b in result["bursts"]:
        if b["round"] < 0:
            lines.append(f"- {b['config']} {b['shape']} c={b['concurrency']}: {b['jobs_per_s']}"
                         f" (engine start {b['start_s']} s)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", default="gpu")
    parser.add_argument("--configs", default="one,tp2,dp2")
    parser.add_argument("--shapes", default="1920x1080")
    parser.add_argument("--concurrency", default="32,64")
    parser.add_argument("--first-concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--combine", nargs="+", help="result files of earlier calls to merge")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        bursts = [b for f in args.combine for b in json.loads(Path(f).read_text())["bursts"]]
        kwargs: dict[str, Any] = json.loads(Path(args.combine[0]).read_text())["engine_kwargs"]
    else:
        unknown = set(args.configs.split(",")) - set(CONFIGS)
        if unknown:
            parser.error(f"unknown configs {sorted(unknown)}; known: {sorted(CONFIGS)}")
        kwargs = {k: v for k, v in engine_kwargs().items() if k != "model"}
        bursts = []
        for name in args.configs.split(","):
            bursts += asyncio.run(run_config(name, args, out))
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "vllm": ".".join(map(str, vllm_version())),
        "engine_kwargs": kwargs,
        "bursts": bursts,
        "table": table(bursts),
    }
    path = out / f"{dt.date.today().isoformat()}-parallel-{args.label}.json"
    path.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    path.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 1 if any(b["errors"] for b in bursts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
