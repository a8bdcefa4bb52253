"""What ``kvsched bench peers`` offers, by name: light enough for the command line to import.

The routers are defined in ``peer_routers.py``, the workloads in ``peer_workloads.py``, the
loads in ``peers.py``; each takes its names from here so that the two never disagree.
"""

from __future__ import annotations

# name -> what the row is (peer_routers.py starts each one).
ROUTER_DESCRIPTIONS: dict[str, str] = {
    "kvsched": "kvsched serve (defaults) as Envoy's ext_proc EPP",
    "sglang": "sglang-router 0.3.2 --policy cache_aware (defaults)",
    "vllm": "vllm-router 0.1.17 --policy kv_aware (defaults)",
    "envoy-rr": "Envoy, ROUND_ROBIN cluster, no EPP",
    "client-rr": "no router: the client round-robins",
}
# The peers' routers, which the goal compares kvsched with (the round-robins set no bar).
PEERS = ("sglang", "vllm")

DEFAULT_WORKLOAD = "rag_tenants"
BUILTIN_WORKLOADS = ("chat", "rag", "agentic", "shared_prefix")
WORKLOADS = (DEFAULT_WORKLOAD, *BUILTIN_WORKLOADS)

# Per-worker KV cache of the pool in blocks of 16 tokens (65k tokens): smaller than every
# workload's working set here, so placement decides hit ratios (an 80 GB H100 holds 27k).
DEFAULT_CAPACITY_BLOCKS = 4096
DEFAULT_WORKERS = 4

MODERATE = 1.0
# Chosen on this 2-core machine: the highest multiple of the default workload's rate at
# which every router still got every answer and round-robin's worker-side TTFT p99 was
# still within 3x of its moderate-load figure (the pool queues, not yet collapses).
NEAR_SATURATION = 2.5
DEFAULT_LOADS = (MODERATE, NEAR_SATURATION)
