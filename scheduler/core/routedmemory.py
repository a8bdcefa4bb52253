"""Prompts kvsched routed, remembered as blocks it assumes the endpoint now caches.

Two users, one mechanism: approximate mode (endpoints that publish no KV events: the
routing history is all kvsched knows, kept for ``approximate.ttl_s``) and speculative
placement (endpoints that do publish: what they will report once the prefill is done and
the events have travelled, kept until the events confirm or contradict it, or a short TTL).

Each remembered prompt is one reference per block in a ``PrefixIndex`` under the endpoint's
name (the index counts references, so two prompts sharing a prefix keep it until both are
forgotten). Plain code over in-memory state; time comes in as ``now``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from scheduler.core.index import PrefixIndex

# A prompt's block keys: a list of ints, or a uint64 array (speculative placement's, from
# the native backend's lazy keys). Sequence covers both for the index's calls.
Keys = Sequence[int]


@dataclass(slots=True, eq=False)
class RoutedPrompt:
    request_id: str
    endpoint: str
    keys: Keys
    expires_at: float
    # Speculative placement: from when the endpoint's events should show the prompt (its
    # first token came, so its prefill is done, plus the events' travel time); None before.
    due_at: float | None = None
    forgotten: bool = False


class RoutedMemory:
    """Remembered prompts in ``index``, forgotten at their expiry or when told."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self._by_expiry: deque[RoutedPrompt] = deque()  # TTLs are fixed per memory: in order
        self._by_request: dict[str, RoutedPrompt] = {}
        self._by_endpoint: dict[str, dict[int, RoutedPrompt]] = {}
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def __iter__(self) -> Iterator[tuple[float, str, str, tuple[int, ...], float | None]]:
        """The prompts remembered, oldest first: (expires_at, endpoint, request, keys, due_at)."""
        for p in self._by_expiry:
            if not p.forgotten:
                yield p.expires_at, p.endpoint, p.request_id, tuple(map(int, p.keys)), p.due_at

    def record(self, request_id: str, endpoint: str, keys: Keys, expires_at: float) -> None:
        """Remember that ``endpoint`` is to hold ``keys``; a request remembered before (it was
        routed again) is forgotten first."""
        previous = self._by_request.get(request_id)
        if previous is not None:
            self.forget(previous)
        prompt = RoutedPrompt(request_id, endpoint, keys, expires_at)
        self.index.record_routed(endpoint, keys)
        self._by_expiry.append(prompt)
        self._by_request[request_id] = prompt
        self._by_endpoint.setdefault(endpoint, {})[id(prompt)] = prompt
        self._live += 1

    def forget(self, prompt: RoutedPrompt) -> None:
        if prompt.forgotten:
            return
        prompt.forgotten = True
        self._live -= 1
        self.index.forget_routed(prompt.endpoint, prompt.keys)
        if self._by_request.get(prompt.request_id) is prompt:
            del self._by_request[prompt.request_id]
        held = self._by_endpoint.get(prompt.endpoint)
        if held is not None:
            held.pop(id(prompt), None)
            if not held:
                del self._by_endpoint[prompt.endpoint]

    def prompt_of(self, request_id: str) -> RoutedPrompt | None:
        return self._by_request.get(request_id)

    def of_endpoint(self, endpoint: str) -> list[RoutedPrompt]:
        return list(self._by_endpoint.get(endpoint, {}).values())

    def expire(self, now: float) -> int:
        """Forget every prompt whose time is up; how many were still remembered."""
        expired = 0
        queue = self._by_expiry
        while queue and (queue[0].forgotten or queue[0].expires_at <= now):
            prompt = queue.popleft()
            if not prompt.forgotten:
                self.forget(prompt)
                expired += 1
        return expired

    def forget_endpoints(self, names: set[str]) -> None:
        for name in names & self._by_endpoint.keys():
            for prompt in list(self._by_endpoint[name].values()):
                self.forget(prompt)

    def unexpired_keys(self, now: float) -> dict[str, set[int]]:
        """Read-only: for each endpoint with prompts past their time that the next ``expire``
        will forget, the keys its prompts still within their time hold."""
        live = [p for p in self._by_expiry if not p.forgotten]
        stale = {p.endpoint for p in live if p.expires_at <= now}
        held: dict[str, set[int]] = {endpoint: set() for endpoint in stale}
        for prompt in live:
            if prompt.expires_at > now and prompt.endpoint in held:
                held[prompt.endpoint].update(prompt.keys)
        return held
