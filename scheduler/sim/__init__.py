"""Simulated vLLM workers: a pure engine model (engine, block pool, latency) and the live
adapters that expose it like a vLLM pod (HTTP API, Prometheus metrics, ZMQ KV events)."""
