"""The GUI-agent workload, as a user measures it: the worker's HTTP path against `vllm serve`.

What agents send: one full-size screenshot per request and a short answer (a point, an
action). So the GPU's prefill and vision encoder dominate, not decoding. This benchmark
sends exactly that through three paths, all over loopback HTTP:

* ``native``: the worker's own job shape, through the runpod SDK's local API server
  (``python handler.py --rp_serve_api``, ``/runsync``): what RunPod's queue delivers;
* ``openai``: the same server, an ``openai_route`` job (RunPod's ``/openai/v1`` traffic);
* ``serve``: ``python -m vllm.entrypoints.openai.api_server`` with the same engine
  arguments (read from the environment through the worker's own ``engine_spec``),
  ``/v1/chat/completions`` with ``stream: true``;
* ``base`` (with ``--base DIR``): native jobs to a second worker started from another
  source tree (``git worktree add DIR <commit>``): a change measured against the code
  before it, in the same rounds, on the same GPU.

Every job carries its own screenshot (no cache can serve one job from another). For each
shape and concurrency, the three paths run one burst each per round, in an order that
rotates from round to round; the ratios worker / serve are taken round by round and
pooled into a geometric mean with a 95 % bootstrap interval, as ``benchmarks.bench``
does. The first burst each server sees after its start is measured apart: compilation
for new batch shapes lands there.

Beside each burst, NVML's GPU utilisation (the share of time a kernel ran) is sampled:
the fraction of the GPU's limit each path reached on this workload, as far as the GPU
itself says. ``--profile`` samples one 32-job burst of each server with py-spy (CPU
time by where it went: the worker, vLLM's front end, the HTTP layer, the engine core).

    python -m benchmarks.agent_workload --out DIR [--shapes 1920x1080,3840x2160,3840x2160@2000000]
        [--concurrency 1,8,32,64] [--rounds 3] [--max-tokens 32] [--paths native,openai,serve]
        [--base DIR --paths native,base]

``MODEL_NAME`` and the engine's variables as the worker reads them (``gpu_bench.sh
agent`` sets the 7B shape). TTFT: client-side for ``serve`` (its first streamed token);
the worker's own ``time_to_first_token_ms`` for ``native`` (``/runsync`` streams nothing
to a client); none for ``openai``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.bench import _bootstrap_ci, data_uri, device_name, pct, screenshot_png  # noqa: E402
from benchmarks.load import free_port  # noqa: E402

from vlm_worker.adapters.vllm import serve_mm_kwargs_flags, vllm_version  # noqa: E402

HOST = "127.0.0.1"
PATHS = ("native", "openai", "serve")
#: What each path's jobs go to.
SERVER_OF = {"native": "worker", "openai": "worker", "serve": "serve", "base": "base"}
PROMPT = "Click the Save button. Answer with the action and the point only."
#: The first-burst check: the first burst after start against the later rounds' median.
FIRST_ROUND_TOLERANCE = 0.10


# ----------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    max_pixels: int | None = None

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``WxH`` or ``WxH@MAXPIXELS`` (a per-request pixel cap)."""
        size, _, cap = text.partition("@")
        w, h = (int(v) for v in size.lower().split("x"))
        return cls(w, h, int(cap) if cap else None)

    @property
    def label(self) -> str:
        base = f"{self.width}x{self.height}"
        return base if self.max_pixels is None else f"{base}@{self.max_pixels / 1e6:g}MP"


def _screenshot(args: tuple[int, int, int]) -> str:
    width, height, seed = args
    return data_uri(screenshot_png(width, height, seed))


class Screenshots:
    """Distinct PNG screenshots made in a process pool before each burst (not timed)."""

    def __init__(self, workers: int) -> None:
        self._pool = ProcessPoolExecutor(max_workers=workers)
        self._seed = 10_000

    def take(self, shape: Shape, n: int) -> list[str]:
        seeds = range(self._seed, self._seed + n)
        self._seed += n
        return list(self._pool.map(_screenshot, [(shape.width, shape.height, s) for s in seeds]))

    def close(self) -> None:
        self._pool.shutdown()


def _messages(uri: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": PROMPT},
            ],
        }
    ]


def native_job(uri: str, shape: Shape, max_tokens: int) -> dict[str, Any]:
    job: dict[str, Any] = {
        "messages": _messages(uri),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": False,
    }
    if shape.max_pixels is not None:
        job["mm_processor_kwargs"] = {"max_pixels": shape.max_pixels}
    return {"input": job}


def chat_body(uri: str, shape: Shape, max_tokens: int, model: str, stream: bool) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "messages": _messages(uri),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if shape.max_pixels is not None:
        body["mm_processor_kwargs"] = {"max_pixels": shape.max_pixels}
    return body


# ------------------------------------------------------------------------ servers
def vllm_cli_args(kwargs: dict[str, Any]) -> list[str]:
    """``AsyncEngineArgs`` keyword arguments as ``vllm serve`` flags (the same engine)."""
    args = ["--model", str(kwargs["model"])]
    for name, value in kwargs.items():
        if name == "model" or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + name.replace("_", "-"))
        elif isinstance(value, dict | list):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def engine_kwargs() -> dict[str, Any]:
    """The engine arguments the worker would start with in this environment."""
    from vlm_worker.config.model_source import resolve_model_source, served_settings
    from vlm_worker.config.settings import load_worker_settings
    from vlm_worker.serving.worker import engine_spec

    settings = load_worker_settings(os.environ)
    source = resolve_model_source(os.environ, settings)
    return dict(engine_spec(os.environ, served_settings(settings, source), source).kwargs)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path
    started_s: float = 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if self.name == "serve" else signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start(
    name: str, cmd: list[str], env: dict[str, str], out: Path, ready: str | None, cwd: Path = ROOT
) -> Server:
    """Start a server and wait for ``ready`` (a URL path) to answer 200; None: for its port
    to accept (the SDK's local server has no health route, and opens only once the
    worker's engine is up)."""
    import socket
    import urllib.request

    port = free_port()
    cmd = [*cmd, *(["--port", str(port), "--host", HOST] if name == "serve" else
                   ["--rp_api_port", str(port), "--rp_api_host", HOST])]  # fmt: skip
    log_path = out / f"{name}.log"
    began = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(name, proc, f"http://{HOST}:{port}", log_path)
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{tail}")
        try:
            if ready is None:
                with socket.create_connection((HOST, port), timeout=1):
                    break
            with urllib.request.urlopen(server.base + ready, timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name} did not come up in 900 s")
        time.sleep(1)
    server.started_s = round(time.perf_counter() - began, 1)
    print(f"{name} up in {server.started_s} s on {server.base}", flush=True)
    return server


def start_worker(
    out: Path, tree: Path = ROOT, name: str = "worker", extra: dict[str, str] | None = None
) -> Server:
    """The worker from ``tree``'s sources (this checkout, or ``--base``'s), with ``extra``
    environment variables (``--base-env``: a setting measured against its default)."""
    env = {k: v for k, v in os.environ.items() if k != "RUNPOD_WEBHOOK_GET_JOB"}
    env |= extra or {}
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != ROOT / "src"]
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), str(tree), *rest])
    cmd = [sys.executable, str(tree / "handler.py"), "--rp_serve_api"]
    return start(name, cmd, env, out, None, cwd=tree)


def start_serve(out: Path, kwargs: dict[str, Any]) -> Server:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *vllm_cli_args(kwargs)]
    cmd += serve_mm_kwargs_flags()  # the capped shape sends max_pixels per request
    return start("serve", cmd, env, out, "/health")


# ------------------------------------------------------------------------ clients
@dataclass
class JobResult:
    seconds: float
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None = None


async def send_native(session: aiohttp.ClientSession, base: str, body: dict) -> JobResult:
    began = time.perf_counter()
    async with session.post(base + "/runsync", json=body) as resp:
        data = await resp.json()
    seconds = time.perf_counter() - began
    output = data.get("output")
    if data.get("status") != "COMPLETED" or not output or "error" in output[-1]:
        return JobResult(seconds, None, None, None, f"{str(data)[:300]}")
    final = output[-1]
    usage, timings = final.get("usage") or {}, final.get("timings") or {}
    return JobResult(
        seconds,
        timings.get("time_to_first_token_ms"),
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
    )


async def send_openai(session: aiohttp.ClientSession, base: str, body: dict) -> JobResult:
    began = time.perf_counter()
    job = {"input": {"openai_route": "/v1/chat/completions", "openai_input": body}}
    async with session.post(base + "/runsync", json=job) as resp:
        data = await resp.json()
    seconds = time.perf_counter() - began
    output = data.get("output")
    if data.get("status") != "COMPLETED" or not output or "choices" not in output[0]:
        return JobResult(seconds, None, None, None, f"{str(data)[:300]}")
    usage = output[0].get("usage") or {}
    return JobResult(seconds, None, usage.get("prompt_tokens"), usage.get("completion_tokens"))


async def send_serve(session: aiohttp.ClientSession, base: str, body: dict) -> JobResult:
    began = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    async with session.post(base + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            text = await resp.text()
            return JobResult(time.perf_counter() - began, None, None, None, text[:300])
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    seconds = time.perf_counter() - began
    ttft = None if first is None else (first - began) * 1000
    return JobResult(seconds, ttft, usage.get("prompt_tokens"), usage.get("completion_tokens"))


# ---------------------------------------------------------------------- GPU busy
class GpuBusy:
    """NVML's utilisation samples (share of time a kernel ran) over a window."""

    def __init__(self, ids: list[int] | None = None) -> None:
        """Over ``ids`` (NVML's numbering), else every GPU ``CUDA_VISIBLE_DEVICES`` shows."""
        self.handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if ids is None:
                ids = [int(i) for i in visible.split(",")] if visible else list(range(count))
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in ids]
            self._nvml = pynvml
        except Exception:
            self.handles = []
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        self._samples, self._stop = [], threading.Event()
        if self.handles:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rates = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
            self._samples.append(sum(rates) / len(rates) / 100)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def share(self) -> float | None:
        return round(float(np.mean(self._samples)), 3) if self._samples else None


# ------------------------------------------------------------------------- bursts
@dataclass
class Burst:
    path: str
    shape: str
    concurrency: int
    jobs: int
    wall_s: float
    jobs_per_s: float
    p50_ms: float
    p95_ms: float
    ttft_p50_ms: float | None
    prompt_tokens: float | None
    gpu_busy: float | None
    errors: list[str] = field(default_factory=list)


async def burst(
    path: str,
    base: str,
    shape: Shape,
    concurrency: int,
    uris: list[str],
    max_tokens: int,
    model: str,
    gpu: GpuBusy,
) -> Burst:
    """``len(uris)`` jobs with ``concurrency`` in flight; bodies are built before the clock."""
    if path in ("native", "base"):
        bodies = [native_job(u, shape, max_tokens) for u in uris]
        send = send_native
    else:
        bodies = [chat_body(u, shape, max_tokens, model, stream=path == "serve") for u in uris]
        send = send_serve if path == "serve" else send_openai
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=900)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(body: dict) -> JobResult:
            async with gate:
                try:
                    return await send(session, base, body)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    return JobResult(0.0, None, None, None, f"{type(exc).__name__}: {exc}")

        with gpu:
            began = time.perf_counter()
            results = await asyncio.gather(*(one(b) for b in bodies))
            wall = time.perf_counter() - began
    errors = [r.error for r in results if r.error]
    errors += [
        f"{r.completion_tokens} tokens, not {max_tokens}"
        for r in results
        if not r.error and r.completion_tokens != max_tokens
    ]
    lat = [r.seconds * 1000 for r in results]
    ttft = [r.ttft_ms for r in results if r.ttft_ms is not None]
    prompt = [r.prompt_tokens for r in results if r.prompt_tokens is not None]
    return Burst(
        path,
        shape.label,
        concurrency,
        len(results),
        round(wall, 3),
        round(len(results) / wall, 3),
        round(pct(lat, 50), 1),
        round(pct(lat, 95), 1),
        round(pct(ttft, 50), 1) if ttft else None,
        round(float(np.mean(prompt)), 1) if prompt else None,
        gpu.share,
        errors[:5],
    )


def jobs_for(concurrency: int) -> int:
    """One burst: ``concurrency`` jobs at once; alone, four in a row."""
    return max(concurrency, 4)


# ------------------------------------------------------------------------ pooling
def pooled(bursts: list[dict], against: str = "serve") -> list[dict]:
    """Per shape, concurrency and worker path: jobs/s ratio to ``against`` in the same
    round, geometric mean over rounds with a 95 % bootstrap interval."""
    rows = []
    bursts = [b for b in bursts if not b["errors"]]
    keys = sorted({(b["shape"], b["concurrency"]) for b in bursts if b.get("round", -1) >= 0})
    for shape, c in keys:
        cell = [b for b in bursts if b["shape"] == shape and b["concurrency"] == c]
        rounds = sorted({b["round"] for b in cell if b["round"] >= 0})
        by = {(b["path"], b["round"]): b for b in cell}
        for path in ("native", "openai", "base"):
            if path == against:
                continue
            logs = [
                np.log(by[(path, r)]["jobs_per_s"] / by[(against, r)]["jobs_per_s"])
                for r in rounds
                if (path, r) in by and (against, r) in by
            ]
            if not logs:
                continue
            arr = np.asarray(logs)
            low, high = (float(np.exp(v)) for v in _bootstrap_ci(arr))
            rows.append(
                {
                    "shape": shape,
                    "concurrency": c,
                    "path": path,
                    "rounds": len(arr),
                    "jobs_per_s_ratio": round(float(np.exp(arr.mean())), 3),
                    "ci95": [round(low, 3), round(high, 3)],
                }
            )
    return rows


def summary_table(bursts: list[dict], against: str = "serve") -> str:
    """Medians over rounds per shape, concurrency and path, with the pooled ratios."""
    ratios = {(r["shape"], r["concurrency"], r["path"]): r for r in pooled(bursts, against)}
    bursts = [b for b in bursts if not b["errors"]]
    lines = [
        "| shape | conc. | path | jobs/s | p50 ms | p95 ms | TTFT p50 ms | prompt tok | GPU busy "
        f"| ratio to {against} (95 % CI) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = sorted({(b["shape"], b["concurrency"]) for b in bursts if b["round"] >= 0})
    for shape, c in keys:
        for path in (*PATHS, "base"):
            cell = [
                b
                for b in bursts
                if (b["shape"], b["concurrency"], b["path"]) == (shape, c, path) and b["round"] >= 0
            ]
            if not cell:
                continue

            def med(key: str, cell: list[dict] = cell) -> str:
                values = [b[key] for b in cell if b[key] is not None]
                if not values:
                    return "-"
                value = float(np.median(values))
                return f"{value:.0f}" if value >= 100 else f"{value:.3g}"

            ratio = ratios.get((shape, c, path))
            rtext = (
                f"{ratio['jobs_per_s_ratio']:.3f} ({ratio['ci95'][0]:.3f} to {ratio['ci95'][1]:.3f})"
                if ratio
                else "-"
            )
            lines.append(
                f"| {shape} | {c} | {path} | {med('jobs_per_s')} | {med('p50_ms')} | "
                f"{med('p95_ms')} | {med('ttft_p50_ms')} | {med('prompt_tokens')} | "
                f"{med('gpu_busy')} | {rtext} |"
            )
    return "\n".join(lines)


def first_rounds(bursts: list[dict]) -> list[dict]:
    """Each server's first burst after start against the median of its later rounds."""
    out = []
    for b in bursts:
        if b["round"] != -1:
            continue
        later = [
            x["jobs_per_s"]
            for x in bursts
            if x["round"] >= 0
            and (x["path"], x["shape"], x["concurrency"])
            == (b["path"], b["shape"], b["concurrency"])
        ]
        if not later:
            continue
        ratio = b["jobs_per_s"] / float(np.median(later))
        out.append(
            {
                "path": b["path"],
                "shape": b["shape"],
                "concurrency": b["concurrency"],
                "first_jobs_per_s": b["jobs_per_s"],
                "later_median_jobs_per_s": round(float(np.median(later)), 3),
                "ratio": round(ratio, 3),
                "within_10_percent": ratio >= 1 - FIRST_ROUND_TOLERANCE,
            }
        )
    return out


# ------------------------------------------------------------------------ profile
def profile_burst(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy over the server and its children for ``seconds`` (None without py-spy)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.environ.get("PYSPY_DIR"))
    if spy is None:
        return None
    cmd = [spy, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
           "--rate", "200", "--duration", str(max(1, int(seconds))), "--nonblocking",
           "--output", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


#: Leaf-to-root, the first frame whose file matches names the share the sample goes to.
CATEGORIES = (
    ("the worker (vlm_worker)", ("vlm_worker/",)),
    ("runpod SDK / HTTP", ("runpod/", "aiohttp/", "uvicorn/", "starlette/", "fastapi/", "h11/")),
    ("vLLM input processing", ("vllm/multimodal/", "vllm/inputs/", "vllm/renderers/",
                               "vllm/v1/engine/input_processor", "vllm/v1/engine/processor")),
    ("transformers processor", ("transformers/",)),
    ("vLLM serving layer", ("vllm/entrypoints/",)),
    ("vLLM engine core / model runner", ("vllm/v1/engine/core", "vllm/v1/worker/",
                                         "vllm/v1/executor/", "vllm/model_executor/",
                                         "vllm/v1/core/", "vllm/v1/attention/")),
    ("vLLM other", ("vllm/",)),
)  # fmt: skip


#: Frames that name where the time went (a torch op's caller, not the op).
_NAMED = ("vlm_worker/", "transformers/", "vllm/", "runpod/", "uvicorn/", "starlette/", "PIL/")


def categorize(collapsed: Path, top: int = 15) -> dict[str, Any]:
    """Samples per category from py-spy's raw (collapsed-stack) output, and the ``top``
    functions by process (``image`` processes, ``engine core``, the ``server``): each
    sample goes to the innermost frame of the worker, vLLM, transformers, the HTTP stack
    or Pillow on its stack."""
    counts: dict[str, int] = {}
    spots: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        name = "other (Python runtime, libraries)"
        for frame in reversed(frames):
            hit = next((cat for cat, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit is not None:
                name = hit
                break
        counts[name] = counts.get(name, 0) + int(n)
        process = next((f for f in reversed(frames) if f.startswith("process ")), "")
        kind = (
            "engine core" if "EngineCore" in process
            else "image" if " -c " in process or "multiprocessing" in process
            else "server"
        )  # fmt: skip
        named = next((f for f in reversed(frames) if any(k in f for k in _NAMED)), "other")
        spot = f"{kind}: {re.sub(r':[0-9]+[)]', ')', named)}"
        spots[spot] = spots.get(spot, 0) + int(n)
        total += int(n)
    shares = {k: round(v / total, 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    hot = sorted(spots.items(), key=lambda kv: -kv[1])[:top]
    return {
        "samples": total,
        "share_of_cpu_samples": shares,
        "top": {k: round(v / total, 3) for k, v in hot},
    }


# ---------------------------------------------------------------------------- run
async def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    shapes = [Shape.parse(s) for s in args.shapes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    paths = [p for p in args.paths.split(",") if p]
    kwargs = engine_kwargs()
    if "base" in paths and args.base is None:
        raise SystemExit("the base path needs --base DIR (another source tree of the worker)")
    servers: dict[str, Server] = {}
    if {"native", "openai"} & set(paths):
        servers["worker"] = start_worker(out)
    if "base" in paths:
        servers["base"] = start_worker(out, args.base, "base", dict(args.base_env))
    if "serve" in paths:
        servers["serve"] = start_serve(out, kwargs)
    base = {p: servers[SERVER_OF[p]].base for p in paths}
    model = await served_model(base)
    gpu = GpuBusy()
    images = Screenshots(args.image_workers)
    bursts: list[dict] = []
    profiles: dict[str, Any] = {}
    # Written after every burst: a run cut short by a time limit keeps what it measured.
    partial = out / f"{dt.date.today().isoformat()}-agent-{args.label}.partial.json"

    async def one(path: str, shape: Shape, c: int, rnd: int) -> None:
        uris = images.take(shape, jobs_for(c))
        spy = None
        if rnd == -1 and args.profile_first and path != "serve":
            name = SERVER_OF[path]
            target = out / f"profile-first-{name}-{shape.label.replace('@', '-')}.txt"
            spy = profile_burst(servers[name].proc.pid, args.profile_seconds, target)
            await asyncio.sleep(1)
        b = await burst(path, base[path], shape, c, uris, args.max_tokens, model[path], gpu)
        if spy is not None:
            spy.wait(timeout=args.profile_seconds + 60)
            if target.exists():
                profiles[f"first {shape.label} {name}"] = categorize(target)
        row = asdict(b) | {"round": rnd}
        bursts.append(row)
        partial.write_text(json.dumps({"engine_kwargs": str(kwargs), "bursts": bursts}))
        tag = {-1: "first", -2: "profile"}.get(rnd, f"r{rnd}")
        print(f"{tag} {shape.label} c={c} {path}: {b.jobs_per_s} jobs/s p50 {b.p50_ms} ms "
              f"busy {b.gpu_busy} errors {len(b.errors)}", flush=True)  # fmt: skip

    try:
        # The first burst each server sees after start, apart from the rounds; with
        # several first shapes, each shape's first burst (what is new to the engine then
        # is the image's shape, not the batch's).
        first_shapes = (
            [Shape.parse(s) for s in args.first_shapes.split(",")]
            if (args.first_shapes)
            else shapes[:1]
        )
        for first_shape in first_shapes if args.first_concurrency > 0 else ():
            for path in paths:
                if path != "openai":
                    await one(path, first_shape, args.first_concurrency, -1)
        for rnd in range(args.rounds):
            for shape in shapes:
                for c in levels:
                    order = paths[rnd % len(paths) :] + paths[: rnd % len(paths)]
                    for path in order:
                        await one(path, shape, c, rnd)
        if args.profile:
            profile_shape = Shape.parse(args.profile_shape) if args.profile_shape else shapes[0]
            for name, server in servers.items():
                path = {"worker": "native"}.get(name, name)
                if path not in paths:
                    continue
                target = out / f"profile-{name}.txt"
                spy = profile_burst(server.proc.pid, args.profile_seconds, target)
                if spy is None:
                    profiles["error"] = "py-spy not found"
                    break
                await asyncio.sleep(1)
                await one(path, profile_shape, 32, -2)
                spy.wait(timeout=args.profile_seconds + 60)
                profiles[name] = categorize(target) if target.exists() else {"error": "no output"}
    finally:
        images.close()
        for server in servers.values():
            server.stop()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "vllm": ".".join(map(str, vllm_version())),
        "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"},
        "model": str(kwargs["model"]),
        "max_tokens": args.max_tokens,
        "start_s": {k: s.started_s for k, s in servers.items()},
        "bursts": bursts,
        "against": args.against,
        "base": None if args.base is None else str(args.base),
        "base_env": dict(args.base_env),
        "pooled": pooled(bursts, args.against),
        "first_round": first_rounds(bursts),
        "profile": profiles,
    }


async def served_model(base: dict[str, str]) -> dict[str, str]:
    """The model id each path must name (``vllm serve``: the path; the worker: its own)."""
    out: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        for path, url in base.items():
            if path == "serve":
                async with session.get(url + "/v1/models") as resp:
                    out[path] = (await resp.json())["data"][0]["id"]
            else:
                job = {"input": {"openai_route": "/v1/models"}}
                async with session.post(url + "/runsync", json=job) as resp:
                    out[path] = (await resp.json())["output"][0]["data"][0]["id"]
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Agent workload, {result['device']}, vLLM {result['vllm']}",
        "",
        f"{result['max_tokens']} output tokens, one distinct screenshot per job; engine "
        f"start: {result['start_s']}.",
        "",
        summary_table(result["bursts"], result.get("against", "serve")),
        "",
        "First burst after start (apart from the rounds):",
        "",
    ]
    for f in result["first_round"]:
        lines.append(
            f"- {f['path']} {f['shape']} c={f['concurrency']}: {f['first_jobs_per_s']} jobs/s "
            f"against {f['later_median_jobs_per_s']} later ({f['ratio']:.3f})"
        )
    if result["profile"]:
        lines += ["", "Profile (py-spy, CPU samples of one 32-job burst):", ""]
        lines.append("```\n" + json.dumps(result["profile"], indent=1) + "\n```")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", default="gpu")
    parser.add_argument("--shapes", default="1920x1080,3840x2160,3840x2160@2000000")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--first-concurrency", type=int, default=32)
    parser.add_argument("--first-shapes", help="shapes of the first bursts (default: the first)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--image-workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--base", help="another source tree of the worker (the base path)")
    parser.add_argument(
        "--base-env",
        action="append",
        default=[],
        type=lambda kv: tuple(kv.split("=", 1)),
        help="NAME=VALUE for the base worker only (repeatable); --base . measures a setting",
    )
    parser.add_argument(
        "--against", help="the path ratios are taken to (default: serve, else base)"
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--profile-shape", help="the profiled burst's shape (default: the first)")
    parser.add_argument(
        "--profile-first", action="store_true", help="profile the workers' first bursts too"
    )
    args = parser.parse_args(argv)
    if args.base is not None:
        args.base = Path(args.base).resolve()
    if args.against is None:
        args.against = "serve" if "serve" in args.paths.split(",") else "base"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args))
    stamp = dt.date.today().isoformat()
    path = Path(args.out) / f"{stamp}-agent-{args.label}.json"
    path.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    path.with_suffix(".md").write_text(md + "\n")
    print(md)
    bad = [b for b in result["bursts"] if b["errors"]]
    if bad:
        print(f"{len(bad)} bursts had errors, e.g. {bad[0]['errors'][:2]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
