"""Tools beside the worker: file generators and model builders. Not in the Docker image."""
