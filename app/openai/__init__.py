"""The OpenAI-compatible surface, one module per role as vLLM's per-endpoint packages.

Chat Completions and models (`/v1/chat/completions`, `/v1/models`): router.py (the HTTP routes),
protocol.py (request and response schemas), serving.py (runs a completion on the engine), errors.py
(OpenAI's error shape, for every OpenAI route). The Conversations and Responses APIs on our sessions live
in conversations/ and responses/, each with its own router, protocol and serving; items.py holds what
they share (OpenAI-style ids for our records, message items).
"""
