"""The prompt: chat templates, image placeholders, and grounding prompts and answers."""
