"""``kvsched doctor``: whether precise cache-aware routing can work against a live pool, and
what to change where it cannot."""
