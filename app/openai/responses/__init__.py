"""OpenAI's Responses API on this server's sessions: see router.py."""
