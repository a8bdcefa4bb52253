"""The end-to-end demo: a simulated pool, kvsched and a real Envoy on loopback."""
