"""Redis: sessions.py (`SessionStore`, the sessions and their turns), history.py (`HistoryStore`, a
conversation's messages by page and by number, cutting them back, its metadata and stored responses),
index.py (`SessionIndex`, each owner's conversations, newest first), quota.py (`StorageQuota`, the sessions
and bytes each key may store), redis_client.py (one Redis or a
Cluster, from REDIS_URL), embedded_redis.py (the private redis-server started when REDIS_URL is unset)."""
