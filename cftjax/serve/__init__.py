"""`cftjax serve`: a checkpoint behind an OpenAI-compatible HTTP API (engine.py batches requests over the
JAX sampler; openai_api.py is the FastAPI app; server.py loads a checkpoint and runs uvicorn)."""
