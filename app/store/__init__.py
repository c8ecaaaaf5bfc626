"""Redis: sessions.py (`SessionStore`, the sessions and their turns), redis_client.py (one Redis or a
Cluster, from REDIS_URL), embedded_redis.py (the private redis-server started when REDIS_URL is unset)."""
