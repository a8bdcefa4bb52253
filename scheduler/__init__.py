"""kvsched: a cache-aware Endpoint Picker for vLLM fleets.

Layout: ``scheduler.core`` is I/O-free (events, block hashing, the prefix index, the
scoring pipeline); ``scheduler.codec`` holds pure wire formats; ``scheduler.adapters``
does the I/O around them (ZMQ ingest, gRPC, scraping, Kubernetes).
"""

import os

# One BLAS thread, unless the environment says otherwise; read when numpy (and scipy, which
# ships a second OpenBLAS) first loads, so it is set before any of them is imported. Their
# worker threads spin after every call (blas_thread_server: 12% of a live kvsched's samples
# under perf with streamed responses, 5% of a simulator run's), and kvsched's matrices (a
# least-squares refit of a few coefficients) gain nothing from them. Measured: CPU per
# routed request 5.04-5.36 -> 4.89-5.00 ms live (bench epp, 64 streamed tokens), a simulator
# run 3.30-3.36 -> 3.15-3.24 s.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
