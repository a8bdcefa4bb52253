"""How much prefill work waits on an endpoint ahead of a new request, and how fast it drains.

kvsched knows what it routed where (each request's prompt tokens not cached there) and when
each of those requests got its first token, but not how far along the engine is with the
prefill in progress: a 60k-token prompt routed 2 s ago may be half done. Counting every
routed-and-not-yet-started token as still to do (``inflight_prefill_tokens``) overstates the
queue exactly where it matters, behind long prompts.

A ``PrefillQueue`` is a fluid estimate instead: routed tokens join the queue, which drains at
the measured prefill rate of the endpoint's class while it is not empty, and never holds
more than the routed tokens still before their first token. The rate is measured from the
requests themselves: one that waited behind ``ahead`` tokens and had ``own`` tokens to
prefill drained ``ahead + own`` tokens between its routing and its first token. Decode
iterations interleaved with the prefill chunks, and traffic from other routers, slow that
rate, and the measurement includes them, so it is the rate a new request will see, not the
engine's peak. It is kept per endpoint class (the same hardware and model), not per
endpoint: a per-endpoint rate is noise wherever an endpoint happened to serve mostly cache
hits, whose TTFT is mostly fixed overhead, and the noise alone moved requests (it broke
approximate mode's load guard in tests/test_scheduler.py). It is a ratio of decayed sums,
tokens over seconds, so long prefills, which measure the rate, outweigh short ones, which
mostly measure overhead.

Core, like the rest of ``scheduler/core``: time is passed in, nothing is read from a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# How fast the measured rate follows new samples: a sample's weight halves after ~14 more.
RATE_DECAY = 0.95


@dataclass(slots=True)
class DrainRate:
    """A measured prefill rate (tokens per second): decayed tokens over decayed seconds."""

    tokens: float = 0.0
    seconds: float = 0.0
    samples: int = 0

    def add(self, tokens: float, seconds: float) -> None:
        if tokens <= 0.0 or seconds <= 0.0:
            return
        self.tokens = RATE_DECAY * self.tokens + tokens
        self.seconds = RATE_DECAY * self.seconds + seconds
        self.samples += 1

    @property
    def tokens_per_s(self) -> float:
        """0 until measured."""
        return self.tokens / self.seconds if self.seconds > 0.0 else 0.0


@dataclass(slots=True)
class PrefillQueue:
    """One endpoint's estimated queue of prefill tokens (see the module docstring)."""

    tokens: float = 0.0  # as of ``at``
    at: float = 0.0

    def ahead(self, now: float, routed_tokens: int, rate: float) -> float:
        """Tokens queued ahead of a request arriving ``now``, draining at ``rate`` tokens a
        second (0: not known, nothing drains); ``routed_tokens`` (the prefill tokens routed
        here and not yet at their first token) bounds it."""
        left = self.tokens
        if now > self.at:
            left -= rate * (now - self.at)
        if left <= 0.0:
            return 0.0
        return left if left < routed_tokens else float(routed_tokens)

    def add(self, tokens: int, now: float, routed_tokens: int, rate: float) -> float:
        """A request with ``tokens`` to prefill was routed here; returns the tokens ahead of it.
        ``routed_tokens`` is the bound before this request."""
        ahead = self.ahead(now, routed_tokens, rate)
        self.tokens, self.at = ahead + tokens, now
        return ahead

    def first_token(self, now: float, routed_tokens: int, rate: float) -> None:
        """A request routed here got its first token: everything ahead of it is done, so no
        more than ``routed_tokens`` (what is left routed here and before its first token)
        can still be queued."""
        self.tokens, self.at = self.ahead(now, routed_tokens, rate), now
