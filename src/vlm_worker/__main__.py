"""``python -m vlm_worker``: the worker, as ``handler.py`` starts it (without a tiny-model builder)."""

from vlm_worker.serving.main import main

if __name__ == "__main__":
    main()
