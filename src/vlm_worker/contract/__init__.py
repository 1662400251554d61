"""The request contract: the job schema, the OpenAI shapes and the one error tree."""
