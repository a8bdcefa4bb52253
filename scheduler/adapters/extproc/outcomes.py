"""Every way a request can leave the Endpoint Picker, and the HTTP status of each refusal.

The one list the picking path, the outcome counters, the audit line and the ext_proc
refusals all read: a new outcome is added here and nowhere else.
"""

from __future__ import annotations

import enum


class PickOutcome(enum.StrEnum):
    """How the Endpoint Picker answered one request (a ``str``: counters and logs use the value).

    ``http_status``: what the gateway answers the client for a refusal (an ext_proc
    ImmediateResponse); None for the routed outcomes and for ``internal_error``, which fails
    the stream instead so the gateway's own failure mode decides.
    """

    http_status: int | None

    def __new__(cls, value: str, http_status: int | None = None) -> PickOutcome:
        member = str.__new__(cls, value)
        member._value_ = value
        member.http_status = http_status
        return member

    ROUTED = "routed"
    ROUTED_FALLBACK = "routed_fallback"  # picking failed; the least-loaded fallback was sent
    NO_ENDPOINTS = "no_endpoints", 503
    SHED = "shed", 429  # flow control: sheddable while saturated, or the waiting room is full
    QUEUE_TIMEOUT = "queue_timeout", 503  # flow control: waited past max_wait_s
    BAD_REQUEST = "bad_request", 400
    TOO_LARGE = "too_large", 413
    INTERNAL_ERROR = "internal_error"

    @property
    def routed(self) -> bool:
        return self in _ROUTED


_ROUTED = frozenset({PickOutcome.ROUTED, PickOutcome.ROUTED_FALLBACK})
