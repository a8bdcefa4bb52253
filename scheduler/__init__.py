"""kvsched: a cache-aware Endpoint Picker for vLLM fleets.

Layout: ``scheduler.core`` is I/O-free (events, block hashing, the prefix index, the
scoring pipeline); ``scheduler.codec`` holds pure wire formats; ``scheduler.adapters``
does the I/O around them (ZMQ ingest, gRPC, scraping, Kubernetes).
"""

__version__ = "0.1.0"
