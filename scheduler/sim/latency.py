"""Step-time model of one vLLM engine iteration: Llama-3-8B (bf16) on one H100 SXM 80GB.

One iteration (``step``) runs a forward pass over every token scheduled in it: the next
chunk of each prefilling request and one token per decoding request. Its duration is::

    T = OVERHEAD
        + max(WEIGHT_READ, LINEAR_PER_TOKEN * (prefill_tokens + decode_seqs))
        + ATTN_PER_PAIR * prefill_attention_pairs
        + KV_READ_PER_TOKEN * decode_context_tokens
        + PER_SEQ * decode_seqs

* the linear layers stream all weights once per step (memory bound, ``WEIGHT_READ``)
  until the step carries enough tokens to be compute bound (``LINEAR_PER_TOKEN``);
* prefill attention is quadratic: a chunk of ``n`` tokens after ``c`` cached/earlier
  tokens has ``n*c + n*(n+1)/2`` causal (query, key) pairs;
* decode attention reads each decoding sequence's whole KV cache (linear in context);
* ``OVERHEAD`` is the fixed per-step cost (scheduler, kernel launches, sampling) that
  vLLM pays even for one token; ``PER_SEQ`` the per-sequence part of it.

Coefficients and where they come from:

* Model facts (https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json):
  32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 128256. That is
  6.98e9 non-embedding parameters (13.96 GFLOP per token through the linear layers),
  16.06 GB of bf16 weights, and 2*32*8*128*2 = 131,072 bytes of KV cache per token.
* Hardware (https://www.nvidia.com/en-us/data-center/h100/): H100 SXM 989 TFLOPS dense
  bf16, 3.35 TB/s HBM3.
* ``WEIGHT_READ`` = 16.06 GB / 3.35 TB/s = 4.79 ms.
* ``OVERHEAD`` = 2.8 ms, two independent vLLM measurements agreeing on the gap between
  the weight-streaming floor and the observed decode step: Llama-3.1-8B bf16 at batch 1 on
  an A100 40GB decodes 75 tok/s (13.3 ms vs a 10.3 ms floor at 1.555 TB/s;
  https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on), and vLLM's CI latency
  test (Llama-3.1-8B TP1 on H200, batch 8, 32 in / 128 out: 833 ms, so 6.5 ms a step vs a
  3.35 ms floor at 4.8 TB/s; https://buildkite.com/vllm/performance-benchmark/builds/9515).
  Batch-1 decode here is therefore 7.6 ms (about 130 tok/s).
* ``PER_SEQ`` = 20 us: NVIDIA NIM's Llama-3.1-8B concurrency sweep on one H100 adds
  about 30 us of inter-token latency per extra concurrent sequence (4.63 ms at 1 to
  7.57 ms at 100; https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance), of
  which the KV-read term below already explains part.
* ``KV_READ_PER_TOKEN`` = 131,072 B / 3.35 TB/s at the ~77% bandwidth efficiency of the
  A100 anchor above = 51 ns per context token per decode step.
* ``LINEAR_PER_TOKEN`` = 33.5 us (42% of bf16 peak): TensorRT-LLM's published Llama-3.1-8B
  FP8 throughput on one H100 at ISL/OSL 2048/128 is 3,450 output tok/s, i.e. 27 req/s or
  about 55k prompt tok/s (https://nvidia.github.io/TensorRT-LLM/performance/perf-overview.html);
  dense bf16 tensor throughput is half of FP8's, giving ~27.6k prompt tok/s in bf16. The
  coefficient is set so that a 2048-token prefill step (overhead and attention included)
  runs at that rate: 74 ms.
* ``ATTN_PER_PAIR`` = 1.3 ns: 4 * 4096 * 32 = 524,288 FLOP per causal (query, key) pair at
  ~400 TFLOPS, a conservative share of the 740 TFLOPS FlashAttention-3 reaches in bf16 on
  H100 (https://arxiv.org/abs/2407.08608). At 8k tokens it is ~13% of the step.

``token_scale`` multiplies token counts for traces whose blocks were scaled down (e.g.
512-token blocks replayed as 16 tokens, scale 32): prefill tokens and decode contexts are
multiplied by it, attention pairs by its square, and because one simulated output token
then stands for ``token_scale`` real ones, a step with decoding sequences is followed by
``token_scale - 1`` further pure-decode iterations in its duration. The model is pure.
"""

from __future__ import annotations

from dataclasses import dataclass


def attention_pairs(chunk_tokens: int, context_before: int) -> int:
    """Causal (query, key) pairs of a prefill chunk of ``chunk_tokens`` after ``context_before``."""
    return chunk_tokens * context_before + chunk_tokens * (chunk_tokens + 1) // 2


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one engine iteration computes, in (unscaled) tokens."""

    prefill_tokens: int = 0
    prefill_attention_pairs: int = 0
    decode_seqs: int = 0
    decode_context_tokens: int = 0

    @property
    def empty(self) -> bool:
        return self.prefill_tokens == 0 and self.decode_seqs == 0


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Seconds per engine iteration; defaults calibrated as in the module docstring."""

    overhead_s: float = 2.8e-3
    weight_read_s: float = 4.79e-3
    linear_per_token_s: float = 3.35e-5
    attn_per_pair_s: float = 1.3e-9
    kv_read_per_token_s: float = 5.1e-8
    per_seq_s: float = 2.0e-5
    token_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.token_scale <= 0:
            raise ValueError("token_scale must be positive")
        for name in (
            "overhead_s",
            "weight_read_s",
            "linear_per_token_s",
            "attn_per_pair_s",
            "kv_read_per_token_s",
            "per_seq_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def _iteration(self, prefill_tokens: float, pairs: float, decode_seqs: int, context: float) -> float:
        linear = max(self.weight_read_s, self.linear_per_token_s * (prefill_tokens + decode_seqs))
        return (
            self.overhead_s
            + linear
            + self.attn_per_pair_s * pairs
            + self.kv_read_per_token_s * context
            + self.per_seq_s * decode_seqs
        )

    def first_iteration_time(self, shape: StepShape) -> float:
        """Duration of the step's first real iteration: the one that ends a prefill and
        produces its first token (the rest of a scaled step is further decoding)."""
        if shape.empty:
            return 0.0
        scale = self.token_scale
        return self._iteration(
            shape.prefill_tokens * scale,
            shape.prefill_attention_pairs * scale * scale,
            shape.decode_seqs,
            shape.decode_context_tokens * scale,
        )

    def decode_iteration_time(self, shape: StepShape) -> float:
        """One real pure-decode iteration of ``shape``'s decoding requests (its prefill ignored)."""
        return self._iteration(0.0, 0.0, shape.decode_seqs, shape.decode_context_tokens * self.token_scale)

    def step_time(self, shape: StepShape) -> float:
        first = self.first_iteration_time(shape)
        scale = self.token_scale
        if shape.decode_seqs == 0 or scale == 1.0:
            return first
        context = shape.decode_context_tokens * scale
        return first + (scale - 1.0) * self._iteration(0.0, 0.0, shape.decode_seqs, context)

    def prefill_time(self, tokens: int, context_before: int = 0) -> float:
        """One step prefilling ``tokens`` new tokens of one request after ``context_before``."""
        return self.step_time(
            StepShape(prefill_tokens=tokens, prefill_attention_pairs=attention_pairs(tokens, context_before))
        )

    def decode_time(self, batch: int, context_per_seq: int) -> float:
        """One pure-decode step of ``batch`` sequences each holding ``context_per_seq`` tokens."""
        return self.step_time(StepShape(decode_seqs=batch, decode_context_tokens=batch * context_per_seq))
