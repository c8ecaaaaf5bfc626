"""One router module per surface: sessions and chat (REST), stream (websocket), admin."""
