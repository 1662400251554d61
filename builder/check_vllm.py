"""Fail the image build when the base image's vLLM is outside the worker's tested range.

Run by the Dockerfile after the worker is installed: a `--build-arg VLLM_VERSION` the
worker was not tested on stops the build here, with the range and what to do, rather
than at run time. The range itself lives in `vlm_worker.adapters.vllm` (CHECKED_AGAINST).
"""

from __future__ import annotations

import sys

from vlm_worker.adapters.vllm import untested_release, vllm_version


def main() -> int:
    problem = untested_release()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"vLLM {'.'.join(map(str, vllm_version()))} is in the tested range")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
