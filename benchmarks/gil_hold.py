"""How long preparing one image in a thread keeps the GIL from everyone else.

A thread that sleeps 0.5 ms in a loop runs beside ``prepare_source`` (base64, decode,
resize: what the worker does for a job prepared in a thread); each time it wakes late,
something held the GIL. Prints, per run, the image's preparation time, the sleeper's
largest gap, and the time spent in gaps over 1.5 ms, for the code as it is and, with
``--against REV``, for ``media/images.py`` as it was at that git revision, alternating.
Revisions before the package layout of 2026-11-30 kept ``images.py`` elsewhere and
imported it relatively: measure those with their own ``benchmarks/gil_hold.py`` in a
``git worktree``.

    .venv/bin/python benchmarks/gil_hold.py [--against REV] [--runs 3] [--size 3840x2160]

Uses the tiny model's image processor (``make model``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # the repo (benchmarks, tools) and the package

from benchmarks.bench import data_uri, screenshot_png  # noqa: E402

from vlm_worker.config.settings import TINY_MODEL_DIR  # noqa: E402
from vlm_worker.media import images  # noqa: E402
from vlm_worker.media.geometry import ImageGeometry  # noqa: E402

SLEEP_S = 0.0005


def images_at(rev: str) -> ModuleType:
    """``vlm_worker/media/images.py`` as it was at ``rev``, importable beside today's."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:src/vlm_worker/media/images.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "images_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("vlm_worker.media.images_then", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(module: ModuleType, uri: str, processor: object) -> tuple[float, float, float]:
    """(preparation ms, the sleeper's largest gap ms, ms spent in gaps over 1.5 ms)."""
    stop = threading.Event()
    gaps: list[float] = []

    def sleeper() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(SLEEP_S)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=sleeper)
    thread.start()
    time.sleep(0.02)
    start = time.perf_counter()
    module.prepare_source(
        uri,
        field="image",
        geometry=ImageGeometry(),
        processor=processor,
        limits=images.ImageLimits(64 << 20, 1 << 26),
    )
    took = time.perf_counter() - start
    stop.set()
    thread.join()
    held = sum(g - SLEEP_S for g in gaps if g > 0.0015)
    return took * 1000, max(gaps) * 1000, held * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="a git revision to compare images.py with")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="3840x2160", help="screenshot-like PNG, WxH")
    args = parser.parse_args()
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(TINY_MODEL_DIR))
    width, height = (int(v) for v in args.size.split("x"))
    uri = data_uri(screenshot_png(width, height, 201))
    modules = {"now": images}
    if args.against:
        modules[args.against] = images_at(args.against)
    for module in modules.values():  # first use: imports, allocator warm-up
        measure(module, uri, processor)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in modules}
    for _ in range(args.runs):
        for name, module in modules.items():
            results[name].append(measure(module, uri, processor))
    print(f"{width}x{height} PNG, {len(uri) / 1e6:.1f} MB as a data URI, {args.runs} runs each")
    for name, runs in results.items():
        took, worst, held = (statistics.median(r[i] for r in runs) for i in range(3))
        print(
            f"{name:>12}: prepare {took:6.1f} ms, sleeper's largest gap {worst:5.1f} ms, "
            f"time in gaps > 1.5 ms {held:5.1f} ms (medians)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
