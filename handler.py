"""RunPod entry point: ``python handler.py``.

Loads the settings and the vLLM engine in this process, warms it up, then hands the
async generator handler to ``runpod.serverless.start``. Local runs
(``python handler.py`` with ``test_input.json`` or ``--test_input '{...}'``) execute the
job for real and print its chunks; ``--rp_serve_api`` serves the SDK's local HTTP API.
All logic lives in the ``vlm_worker`` package (``src/vlm_worker``).
"""

from pathlib import Path

from vlm_worker.serving.main import main


def build_tiny_model(path: Path) -> None:
    """The tiny test model, built from a checkout's ``tools/`` (local runs without
    ``MODEL_NAME``). The Docker image has no ``tools/``: there MODEL_NAME is required."""
    try:
        from tools.tiny_model import build_tiny_model as build
    except ImportError:
        from vlm_worker.contract.errors import ConfigError

        raise ConfigError(
            f"MODEL_NAME is not set and the tiny test model is not built at {path}; "
            "set MODEL_NAME to the model to serve"
        ) from None
    build(path)


if __name__ == "__main__":
    main(build_tiny_model=build_tiny_model)
