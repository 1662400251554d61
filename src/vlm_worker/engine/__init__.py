"""The engine seam: the protocol the job path uses, its vLLM implementation, and stream deltas."""
