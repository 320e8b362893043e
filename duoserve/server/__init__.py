"""The OpenAI-compatible HTTP server: an API process (FastAPI) in front of an engine core process (ZMQ)."""
