"""vlm-worker: a RunPod serverless worker for vision-language models on in-process vLLM."""

__version__ = "0.1.0"
