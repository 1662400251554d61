"""One job from input to chunks: the runner, the image pool and its /dev/shm transport, hooks."""
