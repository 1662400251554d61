"""``MAX_CONCURRENCY`` measured as deployed: the worker behind a RunPod-style job queue,
on the GUI-agent workload.

``MAX_CONCURRENCY`` only acts in the runpod SDK's deployed job loop, which the local
``/runsync`` server bypasses: the loop takes at most that many jobs, and once full it
looks for more only a second later. So the worker runs here as on RunPod
(``python handler.py`` with the webhook variables, ``benchmarks.runpod_queue`` as the
queue), once per setting. Each round queues a backlog of jobs at one instant (a distinct
screenshot each, 32 tokens) and measures, per job, the wait in the queue, the time in
the worker, and their sum, which is what a caller of ``/runsync`` sees; and the
backlog's jobs/s. The first burst after start is kept apart.

The settings cannot share the GPU, so their rounds are not paired: each ratio to the
default is a ratio of geometric means with a 95 % bootstrap interval that resamples each
setting's rounds on its own (``benchmarks.parallel_gpus.unpaired_ratio``).

    python -m benchmarks.queue_concurrency --out DIR [--concurrency 16,32,64]
        [--shape 1920x1080] [--jobs 128] [--rounds 2]

``MODE=queue bash benchmarks/gpu_bench.sh`` sets the 7B shape and the GPU's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.agent_workload import GpuBusy, Screenshots, Shape, native_job  # noqa: E402
from benchmarks.bench import device_name, pct  # noqa: E402
from benchmarks.parallel_gpus import unpaired_ratio  # noqa: E402
from benchmarks.runpod_queue import QueuedJob, RunpodQueue  # noqa: E402

from vlm_worker.adapters.vllm import vllm_version  # noqa: E402

#: The worker's default, which every other setting is compared with.
DEFAULT = 16


def round_stats(jobs: list[QueuedJob], max_tokens: int) -> dict[str, Any]:
    """One backlog's numbers, in ms: queue wait, time in the worker and their sum."""
    start = min(j.queued for j in jobs)
    wall = max(j.done for j in jobs if j.done is not None) - start
    total = [(j.done - j.queued) * 1000 for j in jobs]
    worker = [(j.done - j.taken) * 1000 for j in jobs]
    wait = [(j.taken - j.queued) * 1000 for j in jobs]
    errors = []
    for j in jobs:
        result = j.result or {}
        if "error" in result:
            errors.append(str(result["error"])[:200])
            continue
        tokens = result["output"][-1].get("usage", {}).get("completion_tokens")
        if tokens != max_tokens:
            errors.append(f"{j.id}: {tokens} tokens, not {max_tokens}")
    return {
        "jobs": len(jobs),
        "wall_s": round(wall, 3),
        "jobs_per_s": round(len(jobs) / wall, 3),
        "p50_ms": round(pct(total, 50), 1),
        "p95_ms": round(pct(total, 95), 1),
        "worker_p50_ms": round(pct(worker, 50), 1),
        "worker_p95_ms": round(pct(worker, 95), 1),
        "queue_wait_p50_ms": round(pct(wait, 50), 1),
        "errors": errors[:5],
    }


def start_worker(
    queue: RunpodQueue, concurrency: int, log_path: Path, tree: Path = ROOT
) -> subprocess.Popen:
    """The worker from ``tree``'s sources (this checkout, or ``--base``'s) as deployed."""
    env = {**os.environ, **queue.env(), "MAX_CONCURRENCY": str(concurrency)}
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != ROOT / "src"]
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), str(tree), *rest])
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, str(tree / "handler.py")], cwd=tree, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_setting(concurrency: int, args: argparse.Namespace, out: Path, images: Screenshots,
                tree: str = "worker") -> list[dict]:  # fmt: skip
    """One setting's backlogs: its first after start, then ``args.rounds`` rounds.
    ``tree``: ``worker`` (this checkout) or ``base`` (``--base``'s sources)."""
    shape = Shape.parse(args.shape)
    rows: list[dict] = []
    with RunpodQueue(hold_s=2.0) as queue:
        log_path = out / f"{tree}-{concurrency}.log"
        began = time.perf_counter()
        source = ROOT if tree == "worker" else Path(args.base)
        proc = start_worker(queue, concurrency, log_path, source)
        try:
            while not queue.first_poll.wait(1):
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"worker exited ({proc.returncode}):\n{tail}")
                if time.perf_counter() - began > 900:
                    raise RuntimeError("worker did not poll for jobs in 900 s")
            started = round(time.perf_counter() - began, 1)
            print(f"{tree} MAX_CONCURRENCY={concurrency}: polling after {started} s", flush=True)
            plan = [(-1, args.first_jobs)] if args.first_jobs else []
            plan += [(r, args.jobs) for r in range(args.rounds)]
            gpu = GpuBusy()
            for rnd, n in plan:
                uris = images.take(shape, n)
                inputs = [native_job(u, shape, args.max_tokens)["input"] for u in uris]
                queue.max_in_flight = 0
                with gpu:
                    ids = queue.submit(inputs, prefix=f"{tree}-c{concurrency}-r{rnd}")
                    jobs = queue.wait(ids, timeout=900)
                row = round_stats(jobs, args.max_tokens) | {
                    "tree": tree,
                    "concurrency": concurrency,
                    "round": rnd,
                    "shape": shape.label,
                    "max_in_flight": queue.max_in_flight,
                    "gpu_busy": gpu.share,
                    "start_s": started,
                }
                rows.append(row)
                partial = {"device": device_name(), "rounds": rows}
                (out / f"partial-{tree}-{concurrency}.json").write_text(json.dumps(partial))
                tag = "first" if rnd < 0 else f"r{rnd}"
                print(f"{tree} MAX_CONCURRENCY={concurrency} {tag}: {row['jobs_per_s']} jobs/s, p50 "
                      f"{row['p50_ms']} ms (in worker {row['worker_p50_ms']}), in flight "
                      f"{row['max_in_flight']}, busy {row['gpu_busy']}, errors "
                      f"{len(row['errors'])}", flush=True)  # fmt: skip
        finally:
            stop_worker(proc)
    return rows


def table(rows: list[dict], against: int = DEFAULT) -> list[dict]:
    """Per source tree and setting: medians over rounds, jobs/s against ``against``'s (the
    default) of the same tree, and against the base tree's at the same setting."""
    good = [r for r in rows if r["round"] >= 0 and not r["errors"]]

    def rates(tree: str, c: int) -> list[float]:
        return [r["jobs_per_s"] for r in good if (r.get("tree", "worker"), r["concurrency"])
                == (tree, c)]  # fmt: skip

    out = []
    cells = sorted({(r.get("tree", "worker"), r["concurrency"]) for r in good},
                   key=lambda k: (k[0] != "worker", k[1]))  # fmt: skip
    for tree, c in cells:
        cell = [r for r in good if (r.get("tree", "worker"), r["concurrency"]) == (tree, c)]
        row: dict[str, Any] = {"tree": tree, "concurrency": c, "rounds": len(cell)}
        for key in ("jobs_per_s", "p50_ms", "p95_ms", "worker_p50_ms", "queue_wait_p50_ms",
                    "max_in_flight", "gpu_busy"):  # fmt: skip
            values = [r[key] for r in cell if r[key] is not None]
            row[key] = round(float(np.median(values)), 3) if values else None
        base = rates(tree, against)
        if c != against and base:
            ratio, low, high = unpaired_ratio(rates(tree, c), base)
            row |= {"ratio": round(ratio, 3), "ci95": [round(low, 3), round(high, 3)]}
        if tree == "worker" and rates("base", c):
            ratio, low, high = unpaired_ratio(rates(tree, c), rates("base", c))
            row |= {"to_base": round(ratio, 3), "to_base_ci95": [round(low, 3), round(high, 3)]}
        out.append(row)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# MAX_CONCURRENCY behind a queue: {result['device']}, vLLM {result['vllm']}, "
        f"{result['jobs']} jobs queued at once, ratios to {result['against']}",
        "",
        "| tree | MAX_CONCURRENCY | rounds | jobs/s | p50 ms | p95 ms | in worker p50 ms | queue wait p50 ms | in flight | GPU busy | jobs/s to default (95 % CI) | jobs/s to base (95 % CI) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["table"]:
        ratio = f"{r['ratio']:.3f} ({r['ci95'][0]:.3f} to {r['ci95'][1]:.3f})" if "ratio" in r \
            else "-"  # fmt: skip
        to_base = (f"{r['to_base']:.3f} ({r['to_base_ci95'][0]:.3f} to "
                   f"{r['to_base_ci95'][1]:.3f})" if "to_base" in r else "-")  # fmt: skip
        lines.append(
            f"| {r.get('tree', 'worker')} | {r['concurrency']} | {r['rounds']} | {r['jobs_per_s']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['worker_p50_ms']} | {r['queue_wait_p50_ms']} | "
            f"{r['max_in_flight']} | {r['gpu_busy']} | {ratio} | {to_base} |"
        )
    lines += ["", "First backlog after start, jobs/s:", ""]
    for r in result["rounds"]:
        if r["round"] < 0:
            lines.append(f"- {r.get('tree', 'worker')} {r['concurrency']}: {r['jobs_per_s']} ({r['jobs']} jobs; polling "
                         f"{r['start_s']} s after start)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", default="gpu")
    parser.add_argument("--concurrency", default="16,32,64")
    parser.add_argument("--shape", default="1920x1080")
    parser.add_argument("--jobs", type=int, default=128, help="the backlog each round queues")
    parser.add_argument("--first-jobs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--base", help="another source tree of the worker, measured too")
    parser.add_argument("--base-concurrency", default=str(DEFAULT),
                        help="the settings the base tree runs, each after this tree's")  # fmt: skip
    parser.add_argument("--against", type=int, default=DEFAULT, help="the setting ratios are to")
    parser.add_argument("--combine", nargs="+", help="result or partial files to merge")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = device_name()
    if args.combine:
        files = [json.loads(Path(f).read_text()) for f in args.combine]
        rows = [r for f in files for r in f["rounds"]]
        device = files[0].get("device", device)
    else:
        images = Screenshots(args.image_workers)
        rows = []
        try:
            base_levels = {int(v) for v in args.base_concurrency.split(",")} if args.base else set()
            for c in (int(v) for v in args.concurrency.split(",")):
                rows += run_setting(c, args, out, images)
                if c in base_levels:
                    rows += run_setting(c, args, out, images, tree="base")
        finally:
            images.close()
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "vllm": ".".join(map(str, vllm_version())),
        "against": args.against,
        "jobs": max((r["jobs"] for r in rows if r["round"] >= 0), default=0),
        "rounds": rows,
        "table": table(rows, args.against),
    }
    path = out / f"{dt.date.today().isoformat()}-queue-{args.label}.json"
    path.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    path.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
