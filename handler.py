"""RunPod entry point: ``python handler.py``.

Loads the settings and the vLLM engine in this process, warms it up, then hands the
async generator handler to ``runpod.serverless.start``. Local runs
(``python handler.py`` with ``test_input.json`` or ``--test_input '{...}'``) execute the
job for real and print its chunks; ``--rp_serve_api`` serves the SDK's local HTTP API.
All logic lives in the ``vlm_worker`` package (``src/vlm_worker``).
"""

from vlm_worker.worker import main

if __name__ == "__main__":
    main()
