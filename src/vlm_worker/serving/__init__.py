"""Serving on RunPod: the worker, its entry point, local runs, the OpenAI route, logs."""
