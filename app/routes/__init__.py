"""One router module per surface: sessions and chat (REST), stream (websocket), admin; responses.py
declares their error responses, disconnect.py notices a client hanging up. The OpenAI-compatible
routes are app/openai/router.py."""
