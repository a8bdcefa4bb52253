"""``kvsched bench lora``: LoRA adapter affinity in the virtual-time pool.

The ``lora`` workload (adapters with Zipf popularity, a system prompt every adapter shares)
through simulated engines with ``max_loras`` adapter slots each and an adapter load cost,
routed three ways in the same run: kvsched as configured (affinity on), kvsched with the
``lora_affinity`` weight at 0 (its filter off with it; every other scorer as is, and the
index still keys blocks per adapter), and round-robin. Virtual time: a run is a pure
function of the workload, the pool and the seed, so the machine's load does not move it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scheduler.bench.policies import ttft_percentiles_ms
from scheduler.core.scheduler import SchedulerConfig
from scheduler.core.scoring import ScorerWeights, ScoringConfig
from scheduler.sim.virtual import VirtualPool, VirtualPoolConfig
from scheduler.workloads.generators import lora

# vLLM's --max-loras default is 1; 4 is a common production setting and the shape.
DEFAULT_MAX_LORAS = 4
# Engine time to bring an adapter into a GPU slot. An assumption, not a measurement: a
# rank-16 adapter of an 8B model is ~50-200 MB, read from host memory or disk and copied
# into the slot's weights; tens of milliseconds is the order of magnitude.
DEFAULT_LORA_LOAD_S = 0.05


@dataclass(frozen=True, slots=True)
class Variant:
    label: str
    policy: str
    affinity: bool


VARIANTS = (
    Variant("kvsched", "kvsched", True),
    Variant("kvsched, affinity off", "kvsched", False),
    Variant("round-robin", "round_robin", False),
)


def run_variant(
    variant: Variant,
    *,
    workers: int,
    max_loras: int,
    lora_load_s: float,
    requests: int,
    adapters: int,
    rate: float,
    seed: int,
) -> dict[str, Any]:
    workload = lora(seed=seed, requests=requests, adapters=adapters, rate=rate)
    weights = ScorerWeights() if variant.affinity else ScorerWeights(lora_affinity=0.0)
    config = SchedulerConfig(policy=variant.policy, seed=seed, scoring=ScoringConfig(weights=weights))
    pool = VirtualPool(
        VirtualPoolConfig(workers=workers, max_loras=max_loras, lora_load_s=lora_load_s), config
    )
    outcomes = pool.run(workload.requests)
    served = [o for o in outcomes if o.ok]
    prompt = sum(o.prompt_tokens for o in served)
    cached = sum(o.cached_tokens or 0 for o in served)
    return {
        "label": variant.label,
        "policy": variant.policy,
        "lora_affinity": variant.affinity,
        "requests": len(outcomes),
        "failed": len(outcomes) - len(served),
        "ttft_ms": ttft_percentiles_ms(outcomes),
        "hit_ratio": cached / prompt if prompt else 0.0,
        "adapter_loads": sum(w.engine.lora_loads for w in pool.workers),
    }


def run(
    *,
    workers: int = 8,
    max_loras: int = DEFAULT_MAX_LORAS,
    lora_load_s: float = DEFAULT_LORA_LOAD_S,
    requests: int = 1200,
    adapters: int = 30,
    rate: float = 48.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Every variant on the same workload and pool; ratios against kvsched with affinity."""
    rows = [
        run_variant(
            variant,
            workers=workers,
            max_loras=max_loras,
            lora_load_s=lora_load_s,
            requests=requests,
            adapters=adapters,
            rate=rate,
            seed=seed,
        )
        for variant in VARIANTS
    ]
    best = rows[0]["ttft_ms"]
    for row in rows:
        row["ttft_vs_kvsched"] = {q: row["ttft_ms"][q] / best[q] if best[q] else None for q in ("p50", "p99")}
    return {
        "workers": workers,
        "max_loras": max_loras,
        "lora_load_s": lora_load_s,
        "requests": requests,
        "adapters": adapters,
        "rate": rate,
        "seed": seed,
        "rows": rows,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['requests']} requests over {report['adapters']} adapters at {report['rate']:g}/s, "
        f"{report['workers']} pods x {report['max_loras']} slots, load {report['lora_load_s'] * 1000:g} ms",
        f"{'routing':<24} {'TTFT p50 ms':>12} {'p99 ms':>10} {'p50 x':>7} {'p99 x':>7} "
        f"{'hit ratio':>10} {'loads':>7}",
    ]
    for row in report["rows"]:
        ttft, ratio = row["ttft_ms"], row["ttft_vs_kvsched"]
        lines.append(
            f"{row['label']:<24} {ttft['p50']:>12.1f} {ttft['p99']:>10.1f} "
            f"{ratio['p50']:>7.2f} {ratio['p99']:>7.2f} {row['hit_ratio']:>10.3f} {row['adapter_loads']:>7}"
        )
    return "\n".join(lines)
