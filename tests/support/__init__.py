"""Helpers the tests share: jobs and images (``jobs``), the SDK's HTTP server (``server``),
a scripted engine (``fakes``) and the official OpenAI client over the route (``openai_shim``).

``tests/`` is on ``sys.path`` (pytest's ``pythonpath``), so tests import ``support.*``.
"""
