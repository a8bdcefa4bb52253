"""``lora_affinity``: send a LoRA request where its adapter is already in a GPU slot.

A request that names an adapter (its ``model``) costs an endpoint an adapter load when the
adapter is not resident there, and waits for a running request to finish when every one of
the endpoint's ``max_lora`` slots is taken by adapters its requests are using: vLLM skips a
waiting request whose adapter would make the batch's adapters exceed ``--max-loras`` (vLLM
``vllm/v1/core/sched/scheduler.py``, ``scheduled_loras``). What each endpoint holds comes
from its ``vllm:lora_requests_info`` (``EndpointState.lora``, see ``types.LoraSlots``).

Per candidate, best first:

* ``1.0`` the adapter is running or waiting there (resident, or loading for a request ahead);
* ``0.8`` kvsched routed it there lately and a slot is not busy with others (most likely
  still resident: vLLM keeps loaded adapters until their slot is needed, LRU);
* ``0.5`` a slot is not busy: the adapter loads there without anyone waiting;
* ``0.5`` the endpoint reports no adapter figures (not scraped yet): neither a reason to
  prefer nor to avoid it;
* ``0.0`` every slot is busy with other adapters: the request waits for one to drain.

``LoraSlotFilter`` (``filters.py``) goes further for the last case: such an endpoint is left out whenever
another candidate can take the request without evicting an adapter in use. Both sit out
the picks of requests that name no adapter, so a pool without LoRA is scored exactly as
before. The filter applies while the scorer has a weight: one knob turns affinity on.
"""

from __future__ import annotations

# Imported for its registration only: scorers are summed in registration order, and the
# built-in ones (scorers.py, prefill_wait.py) keep theirs ahead of this one whatever the
# order this package's modules are imported in.
import scheduler.core.scoring.prefill_wait  # noqa: F401
from scheduler.core.scoring.candidates import Candidates
from scheduler.core.scoring.config import ScoringConfig
from scheduler.core.scoring.registry import register_scorer
from scheduler.core.scoring.types import LORA_UNKNOWN, PickRequest


class LoraAffinityScorer:
    name = "lora_affinity"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        adapter = request.adapter
        if adapter is None:
            return [1.0] * len(candidates)
        return [LORA_UNKNOWN if s.lora is None else s.lora.affinity(adapter) for s in candidates.states]


register_scorer(
    "lora_affinity",
    LoraAffinityScorer,
    weight=2.0,
    description="For a request naming a LoRA adapter: the adapter already in a slot there first, then a "
    "slot not busy with other adapters; never an endpoint whose every slot is busy while another can "
    "take it (vllm:lora_requests_info).",
    needs_adapter=True,
)
