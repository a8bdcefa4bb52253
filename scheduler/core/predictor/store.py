"""Bounded, stratified store of observed (features, TTFT, TPOT) samples.

Traffic is dominated by a few regimes (one endpoint class, light load, short prompts); a
plain reservoir would hold almost nothing from the rare ones (a saturated endpoint, a
32k-token prompt), which are exactly where a wrong prediction costs most. So samples are
grouped into strata, endpoint class x load bucket x prompt-size bucket, each stratum keeps
a uniform reservoir sample of its own stream, and once the store is full a stratum below
its fair share (capacity / strata seen) takes its slot from the largest stratum.

A deterministic slice of the observations, chosen by a hash of their sequence number, goes
to a separate held-out store that training never reads, so accuracy is measured on samples
the model has not seen.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from scheduler.core.predictor.features import (
    DECODE_BATCH,
    ENDPOINT_CLASS_ID,
    NUM_FEATURES,
    UNCACHED_TOKENS,
    WAITING,
    FeatureMatrix,
)

# Requests queued or decoding there (waiting + decode batch): idle, light, busy, heavy, overloaded.
LOAD_EDGES: Final = (1.0, 8.0, 32.0, 128.0)
# Uncached prompt tokens: prefill cost spans three orders of magnitude across these.
PROMPT_EDGES: Final = (256.0, 1024.0, 4096.0, 16384.0)
# Endpoint classes beyond this many share strata (class id modulo), keeping the store's
# stratum count, and so each one's fair share, bounded whatever ids a deployment uses.
CLASS_SLOTS: Final = 8

StratumKey = tuple[int, int, int]


def stratum_of(row: FeatureMatrix) -> StratumKey:
    """The stratum of one feature row."""
    class_id = float(row[ENDPOINT_CLASS_ID])
    load = float(row[WAITING]) + float(row[DECODE_BATCH])
    return (
        # A missing class (NaN) shares class 0's strata rather than failing the observation.
        int(class_id) % CLASS_SLOTS if math.isfinite(class_id) else 0,
        bisect.bisect_right(LOAD_EDGES, load),
        bisect.bisect_right(PROMPT_EDGES, float(row[UNCACHED_TOKENS])),
    )


def is_held_out(sequence: int, fraction: float) -> bool:
    """Whether observation number ``sequence`` belongs to the held-out slice (splitmix64 hash)."""
    x = (sequence + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x < fraction * 2.0**64


@dataclass(frozen=True, slots=True, eq=False)
class SampleArrays:
    """A copy of stored samples; a target that was not observed is NaN."""

    features: FeatureMatrix
    ttft_ms: npt.NDArray[np.float64]
    tpot_ms: npt.NDArray[np.float64]
    sequence: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @staticmethod
    def empty() -> SampleArrays:
        return SampleArrays(
            np.empty((0, NUM_FEATURES), dtype=np.float32),
            np.empty(0, dtype=np.float64),
            np.empty(0, dtype=np.float64),
            np.empty(0, dtype=np.int64),
        )

    def freeze(self) -> SampleArrays:
        for array in (self.features, self.ttft_ms, self.tpot_ms, self.sequence):
            array.setflags(write=False)
        return self


@dataclass(slots=True)
class _Stratum:
    slots: list[int] = field(default_factory=list)  # rows of the store's arrays it holds
    seen: int = 0  # samples offered to it, kept or not


class StratifiedReservoir:
    """At most ``capacity`` samples, reservoir-sampled per stratum (see the module docstring)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._features = np.zeros((capacity, NUM_FEATURES), dtype=np.float32)
        self._ttft = np.full(capacity, np.nan, dtype=np.float64)
        self._tpot = np.full(capacity, np.nan, dtype=np.float64)
        self._sequence = np.zeros(capacity, dtype=np.int64)
        # Popped from the end: slots fill in order 0, 1, 2, ...
        self._free = list(range(capacity - 1, -1, -1))
        self._strata: dict[StratumKey, _Stratum] = {}
        self._rng = random.Random(seed)
        self.offered = 0

    def __len__(self) -> int:
        return self.capacity - len(self._free)

    @property
    def strata(self) -> dict[StratumKey, int]:
        """Samples held per stratum."""
        return {key: len(s.slots) for key, s in self._strata.items() if s.slots}

    def add(self, row: FeatureMatrix, ttft_ms: float | None, tpot_ms: float | None, sequence: int) -> bool:
        """Offer one sample; True when it was kept."""
        key = stratum_of(row)
        stratum = self._strata.get(key)
        if stratum is None:
            stratum = self._strata[key] = _Stratum()
        stratum.seen += 1
        self.offered += 1
        if self._free:
            slot = self._free.pop()
            stratum.slots.append(slot)
        elif len(stratum.slots) < self.capacity // len(self._strata):
            slot = self._evict_from_largest()
            stratum.slots.append(slot)
        else:
            # Reservoir step: keep the seen-th sample with probability held / seen, in place
            # of a uniformly chosen one, so the stratum stays a uniform sample of its stream.
            j = self._rng.randrange(stratum.seen)
            if j >= len(stratum.slots):
                return False
            slot = stratum.slots[j]
        self._features[slot] = row
        self._ttft[slot] = math.nan if ttft_ms is None else ttft_ms
        self._tpot[slot] = math.nan if tpot_ms is None else tpot_ms
        self._sequence[slot] = sequence
        return True

    def _evict_from_largest(self) -> int:
        largest = max(self._strata.values(), key=lambda s: len(s.slots))
        slots = largest.slots
        # Removing a uniformly chosen member leaves a uniform sample of the stratum.
        j = self._rng.randrange(len(slots))
        slots[j], slots[-1] = slots[-1], slots[j]
        return slots.pop()

    def arrays(self) -> SampleArrays:
        """A copy of every held sample, in slot order (deterministic for a given history)."""
        if len(self) == 0:
            return SampleArrays.empty()
        held = np.fromiter(
            (slot for s in self._strata.values() for slot in s.slots), dtype=np.int64, count=len(self)
        )
        held.sort()
        return SampleArrays(
            self._features[held], self._ttft[held], self._tpot[held], self._sequence[held]
        ).freeze()


class SampleStore:
    """Training and held-out reservoirs, split by the observation's sequence number."""

    def __init__(self, max_samples: int, holdout_fraction: float, seed: int = 0) -> None:
        holdout_capacity = max(1, math.ceil(max_samples * holdout_fraction))
        if holdout_capacity >= max_samples:
            raise ValueError("holdout_fraction leaves no room for training samples")
        self.holdout_fraction = holdout_fraction
        self.train = StratifiedReservoir(max_samples - holdout_capacity, seed)
        self.holdout = StratifiedReservoir(holdout_capacity, seed + 1)
        self.observed = 0

    def __len__(self) -> int:
        return len(self.train) + len(self.holdout)

    def add(self, row: FeatureMatrix, ttft_ms: float | None, tpot_ms: float | None) -> bool:
        """Store one observation; True when it went to the held-out slice."""
        sequence = self.observed
        self.observed += 1
        held_out = is_held_out(sequence, self.holdout_fraction)
        (self.holdout if held_out else self.train).add(row, ttft_ms, tpot_ms, sequence)
        return held_out
