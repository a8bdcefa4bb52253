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
    "envoy-floor": "Envoy + a protocol-only native ext_proc (workers in turn): the data path's floor",
    "client-rr": "no router: the client round-robins",
}
# The peers' routers, which the goal compares kvsched with (the round-robins set no bar).
PEERS = ("sglang", "vllm")
# The data path's floor behind Envoy: kvsched's data path is reported against it.
FLOOR_ROUTER = "envoy-floor"

DEFAULT_WORKLOAD = "rag_tenants"
BUILTIN_WORKLOADS = ("chat", "rag", "agentic", "shared_prefix")
WORKLOADS = (DEFAULT_WORKLOAD, *BUILTIN_WORKLOADS)

# Per-worker KV cache of the pool in blocks of 16 tokens (65k tokens): smaller than every
# workload's working set here, so placement decides hit ratios (an 80 GB H100 holds 27k).
DEFAULT_CAPACITY_BLOCKS = 4096
DEFAULT_WORKERS = 4

# A load is how busy the pool is relative to the workload at its own rate on the simulated
# H100s. Load L runs the same arrival schedule on GPUs L times slower (``kvsched sim --speed
# 1/L``): the pool is L times as busy while the routers, the client and this machine see the
# same requests per second. (Raising the rate instead is ``--rate``; on a 2-core machine the
# set-up's own CPU gives out first: at 2.5x rag_tenants' rate, 30 req/s, kvsched + Envoy
# alone need ~0.9 of a core and the pool's four processes ~0.6.)
MODERATE = 1.0
# In the virtual-time pool (same engine model, real Scheduler), rag_tenants on 4 workers of
# 4,096 blocks: at 6x, round-robin's queues have run away (TTFT p50 1.1 s against 76 ms at
# 1x) while cache-aware routing is near its limit (kvsched p99 292 ms against 96 ms at 1x;
# at 12x its p50 is 700 ms). Both regimes of a near-saturated pool in one setting.
NEAR_SATURATION = 6.0
DEFAULT_LOADS = (MODERATE, NEAR_SATURATION)
