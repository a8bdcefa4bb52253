"""The wire format of the in-flight load replicas share (``core/peerload.py``): msgpack.

One ZMQ message per ``SyncMessage``, a single frame::

    [version, replica, incarnation, seq, sent_at_unix_s, kind, body]

``kind`` 0 = Routed ``[request_id, endpoint, prefill_tokens, ttl_s, prefill_ttl_s, prefilling]``
(a sampled one adds ``[block keys], prompt_tokens``; one whose prompt is placed speculatively
adds, after those two (empty when not sampled), ``[placed block keys], placed_on``),
1 = Released ``[request_id, phase (0 first token, 1 done), drained_tokens, waited_s]``,
2 = Snapshot ``[[routed fields], ...]``, 3 = Observed ``[routed_id, phase (0 first byte,
1 completed, 2 the observation broke off), first_byte, status, served, cached_tokens,
completion_tokens]`` (an observation stream's account of a response another replica routed,
for that replica; ``incarnation`` and ``seq`` are 0: it is addressed, not part of the load
state), 4 = Placed ``[request_id, placed_on, [placed block keys]]`` (a routed request's
speculative placement, widened after its pick; a replica of an earlier release counts it as
a malformed frame and skips it, losing only the wider placement). ``sent_at`` is wall-clock
time (seconds since the epoch): replicas' monotonic clocks are not comparable, so the
transport maps it to and from the scheduler's clock. Positional arrays keep a Routed message
to about 60 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from scheduler.core.peerload import DONE, FIRST_TOKEN, Placed, Released, Routed, Snapshot, SyncMessage

WIRE_VERSION = 1
ROUTED, RELEASED, SNAPSHOT, OBSERVED, PLACED = 0, 1, 2, 3, 4
FIRST_BYTE, COMPLETED, BROKEN = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ObservedResponse:
    """What an observation stream on one replica saw of a response ``routed_id`` names (another
    replica routed it). ``phase``: FIRST_BYTE, COMPLETED or BROKEN (the observation stream ended
    before the response did); ``first_byte``: the first body byte came with this message."""

    replica: str  # the sender
    routed_id: str
    phase: int
    first_byte: bool = False
    status: int | None = None
    served: str | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None


class PeerSyncDecodeError(ValueError):
    """A frame that is not a sync message of this version."""


def _routed_fields(routed: Routed) -> list[Any]:
    fields: list[Any] = [
        routed.request_id,
        routed.endpoint,
        routed.prefill_tokens,
        round(routed.ttl_s, 3),
        round(routed.prefill_ttl_s, 3),
        routed.prefilling,
    ]
    if routed.sample_keys or routed.placed_keys:
        fields += [list(routed.sample_keys), routed.sample_prompt_tokens]
    if routed.placed_keys:
        fields += [list(routed.placed_keys), routed.placed_on]
    return fields


def _routed(fields: Any) -> Routed:
    request_id, endpoint, prefill_tokens, ttl_s, prefill_ttl_s, prefilling = fields[:6]
    keys, prompt_tokens = fields[6:8] if len(fields) >= 8 else ((), 0)
    placed, placed_on = fields[8:10] if len(fields) >= 10 else ((), "")
    return Routed(
        str(request_id),
        str(endpoint),
        int(prefill_tokens),
        float(ttl_s),
        float(prefill_ttl_s),
        bool(prefilling),
        tuple(map(int, keys)),
        int(prompt_tokens),
        tuple(map(int, placed)),
        str(placed_on),
    )


def encode(message: SyncMessage, sent_at_unix_s: float) -> bytes:
    body = message.body
    if isinstance(body, Routed):
        kind, fields = ROUTED, _routed_fields(body)
    elif isinstance(body, Released):
        phase = 0 if body.phase == FIRST_TOKEN else 1
        kind, fields = (
            RELEASED,
            [body.request_id, phase, round(body.drained_tokens, 1), round(body.waited_s, 4)],
        )
    elif isinstance(body, Placed):
        kind, fields = PLACED, [body.request_id, body.placed_on, list(body.placed_keys)]
    else:
        kind, fields = SNAPSHOT, [_routed_fields(routed) for routed in body.entries]
    frame = [WIRE_VERSION, message.replica, message.incarnation, message.seq, sent_at_unix_s, kind, fields]
    return bytes(msgpack.packb(frame, use_bin_type=True))


def encode_observed(observed: ObservedResponse, sent_at_unix_s: float) -> bytes:
    fields = [
        observed.routed_id,
        observed.phase,
        observed.first_byte,
        observed.status,
        observed.served,
        observed.cached_tokens,
        observed.completion_tokens,
    ]
    frame = [WIRE_VERSION, observed.replica, 0, 0, sent_at_unix_s, OBSERVED, fields]
    return bytes(msgpack.packb(frame, use_bin_type=True))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def decode(frame: bytes) -> tuple[SyncMessage, float]:
    """The message (``sent_at`` left 0.0 for the transport to map) and its wall-clock send time."""
    message, sent_at = decode_any(frame)
    if isinstance(message, ObservedResponse):
        raise PeerSyncDecodeError("an observed response, not a load message")
    return message, sent_at


def decode_any(frame: bytes) -> tuple[SyncMessage | ObservedResponse, float]:
    """``decode``, and observed responses besides."""
    try:
        version, replica, incarnation, seq, sent_at, kind, fields = msgpack.unpackb(frame, raw=False)
        if version != WIRE_VERSION:
            raise PeerSyncDecodeError(f"wire version {version!r}, expected {WIRE_VERSION}")
        body: Routed | Released | Snapshot | Placed
        if kind == OBSERVED:
            routed_id, phase, first_byte, status, served, cached, completion = fields
            if phase not in (FIRST_BYTE, COMPLETED, BROKEN):
                raise PeerSyncDecodeError(f"unknown observed phase {phase!r}")
            observed = ObservedResponse(
                str(replica),
                str(routed_id),
                int(phase),
                bool(first_byte),
                _optional_int(status),
                None if served is None else str(served),
                _optional_int(cached),
                _optional_int(completion),
            )
            return observed, float(sent_at)
        if kind == ROUTED:
            body = _routed(fields)
        elif kind == RELEASED:
            request_id, phase, drained, waited = fields
            body = Released(
                str(request_id), FIRST_TOKEN if phase == 0 else DONE, float(drained), float(waited)
            )
        elif kind == SNAPSHOT:
            body = Snapshot(tuple(_routed(entry) for entry in fields))
        elif kind == PLACED:
            request_id, placed_on, keys = fields
            body = Placed(str(request_id), str(placed_on), tuple(map(int, keys)))
        else:
            raise PeerSyncDecodeError(f"unknown message kind {kind!r}")
        return SyncMessage(str(replica), int(incarnation), int(seq), 0.0, body), float(sent_at)
    except PeerSyncDecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise PeerSyncDecodeError(f"malformed sync frame ({len(frame)} bytes): {exc}") from exc
