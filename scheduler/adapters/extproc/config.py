"""Settings of the Endpoint Picker gRPC server (ext_proc and kvsched.v1), with their defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Names fixed by the GIE Endpoint Picker protocol (docs/proposals/004-endpoint-picker-protocol).
DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"
# Proposed for the protocol's v1.1 (gateway-api-inference-extension issue #2985, "optional
# per-endpoint scores in EPP ext-proc dynamic metadata"): envoy.lb's map of ip:port -> score,
# optional, never reordering the destination list; llm-d-router emits it behind
# --emit-endpoint-scores (llm-d-router pull request #2004).
SCORES_KEY = "x-gateway-destination-endpoint-scores"
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"


TransportChoice = Literal["auto", "native", "python"]


class ExtProcConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: TransportChoice = Field(
        "auto",
        description="What serves the ext_proc and health ports: 'native' (gRPC C++, "
        "scheduler._native.extproc, built when libgrpc++ is present), 'python' (grpcio), or "
        "'auto' (native when built, else python). Decisions are the same either way; the native "
        "transport keeps Python off the protocol's per-message path.",
    )

    on_internal_error: Literal["fallback", "grpc_error"] = Field(
        "fallback",
        description="When picking raises: 'fallback' routes to the least-loaded healthy endpoints; "
        "'grpc_error' fails the ext_proc stream so the gateway's FailOpen/FailClose applies.",
    )
    destination_list: bool = Field(
        False,
        description="Write the ordered fallback list (primary,fallback,...) into "
        "x-gateway-destination-endpoint and its envoy.lb metadata. Needs a data plane that "
        "takes lists (Envoy's override_host load balancing policy); an ORIGINAL_DST cluster "
        "connects to exactly one ip:port, so the default sends the primary alone.",
    )
    endpoint_scores: int = Field(
        0,
        ge=0,
        le=256,
        description="Put up to this many candidates' scores (the routed endpoints first, then the "
        "best of the rest; the scoring pipeline's weighted total, 0..1) in the envoy.lb metadata "
        "under x-gateway-destination-endpoint-scores, for the gateway's access log. 0 = off.",
    )
    max_body_chunk_bytes: int = Field(
        62_000,
        ge=1024,
        le=4 * 1024 * 1024,
        description="Largest streamed_response chunk sent back to the gateway (GIE uses 62,000).",
    )
    max_request_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Request bodies above this are refused with 413."
    )
    max_response_parse_bytes: int = Field(
        16 * 1024 * 1024,
        ge=0,
        description="Non-streamed response bodies up to this size are parsed whole for 'usage'; "
        "beyond it only the body's tail is searched.",
    )
    tokenize_max_chars: int = Field(
        512 * 1024,
        ge=1024,
        description="Routing reads at most this many characters of a text prompt (the request "
        "itself goes on whole; the model server judges its length). Tokenising a 10 MB prompt "
        "took 50 s and 1.3 GB here; 512 Ki characters (about 128k tokens at 4 characters a "
        "token, a 128k-context model's window) took 3.5 s and 60 MB.",
    )
    tokenize_held_prefix_above_chars: int = Field(
        2048,
        ge=0,
        description="A text prompt longer than this is tokenised for a pick only as far as some "
        "endpoint holds it (asked before each piece the piece cache does not have, while 1 Ki "
        "characters or more are left; the tokens after are estimated at the ratio of the part "
        "tokenised): no later token can change a prefix match. The rest is tokenised once the "
        "answer is sent, for the prompt's placement. A prompt nobody holds yet (a new system "
        "prompt, a new document) is then answered after one piece, not the whole text "
        "(a 6.8 K-character prompt: ~0.5 ms instead of ~3.6 ms of tokenising on a 2-core "
        "machine). 0: every prompt whole before the pick (up to tokenize_max_chars).",
    )
    tokenize_placed_chars: int = Field(
        32 * 1024,
        ge=0,
        description="A prompt picked for from its leading ids has its rest tokenised after the "
        "answer up to this many characters, for the placement the next requests sharing it see "
        "before its KV events come (a longer prompt's placement covers that much; the events "
        "report the rest): tokenising 220 KB costs ~47 ms of CPU, its first 32 Ki characters ~7.",
    )
    tokenize_in_thread_chars: int = Field(
        16 * 1024,
        ge=0,
        description="Prompts with more characters than this are tokenised off the event loop.",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=4 * 1024 * 1024, description="gRPC receive/send message size limit."
    )
    picker_api_max_pending: int = Field(
        100_000,
        ge=1,
        description="kvsched.v1 picks awaiting a Report; the oldest is released as failed beyond this.",
    )
    session_header: str = Field(
        "x-session-id",
        min_length=1,
        pattern=r"^[a-z0-9!#$%&'*+.^_`|~-]+$",
        description="Request header naming the session a request belongs to (lower case, as HTTP/2 "
        "sends names), for session affinity (scoring.session_affinity and the session_affinity "
        "scorer). Read by both transports; a change needs a restart.",
    )
    health_refresh_s: float = Field(
        1.0, gt=0, description="How often readiness is re-evaluated for health Watch streams."
    )
