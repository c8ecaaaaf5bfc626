"""The OpenAI-compatible surface (`/v1/chat/completions`, `/v1/models`), one module per role as vLLM's
per-endpoint packages: router.py (the HTTP routes), protocol.py (request and response schemas),
serving.py (runs a completion on the engine), errors.py (OpenAI's error shape)."""
