"""OpenAI's Conversations API on this server's sessions: see router.py."""
