"""The adaptive token budget: the worker learns the batch size that encodes fastest.

A hill climb over powers of two, between the longest single text and the memory cap:
measure tokens/s over a few full batches at the current budget, try the next size up
while that keeps improving, otherwise the next size down, and settle on the best. Out of
memory lowers the cap for good; a batch slower than the latency target steps down at once.
Every ``REEXPLORE_BATCHES`` batches the climb starts again from the settled budget, since
the traffic (text lengths) may have changed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

# Batches measured at one budget before judging it; fewer is noise on a shared machine.
SAMPLES_PER_STEP = 6
# A larger budget must beat the best by this much to be kept (noise is ~5%).
MIN_GAIN = 1.05
# A batch counts only if it filled this share of the budget (small ones say nothing).
FULL_SHARE = 0.5
REEXPLORE_BATCHES = 2000


@dataclass
class BudgetTuner:
    """Learns ``budget`` (padded tokens per batch) from ``observe`` calls."""

    budget: int
    floor: int
    cap: int
    latency_target_s: float | None = None
    adaptive: bool = True
    rates: dict[int, float] = field(default_factory=dict)
    settled: bool = False
    _samples: list[float] = field(default_factory=list)
    _direction: int = 1
    _batches: int = 0

    def __post_init__(self) -> None:
        self.floor = max(1, min(self.floor, self.cap))
        self.budget = self._clamp(self.budget)

    def observe(self, padded: int, tokens: int, seconds: float) -> None:
        """Record one encoded batch: its padded cost, real tokens and wall seconds."""
        self._batches += 1
        if not self.adaptive or seconds <= 0:
            return
        if self.latency_target_s and seconds > self.latency_target_s and self.budget > self.floor:
            self.too_big()
            return
        if padded < FULL_SHARE * self.budget:
            return
        if self.settled:
            if self._batches % REEXPLORE_BATCHES == 0:
                self.rates.clear()
                self.settled, self._direction = False, 1
            return
        self._samples.append(tokens / seconds)
        if len(self._samples) >= SAMPLES_PER_STEP:
            self._judge(statistics.median(self._samples))

    def too_big(self) -> None:
        """A batch at this budget ran out of memory or missed the latency target: halve it
        and never try this size again."""
        self.cap = max(self.floor, self.budget // 2)
        self._move_to(self._clamp(self.budget // 2), settle=True)

    def _judge(self, rate: float) -> None:
        others = [r for budget, r in self.rates.items() if budget != self.budget]
        self.rates[self.budget] = rate
        best = max(self.rates, key=self.rates.__getitem__)
        if not others or rate > max(others) * MIN_GAIN:
            nxt = self._clamp(self.budget * 2 if self._direction == 1 else self.budget // 2)
            if nxt not in self.rates:
                return self._move_to(nxt)
        if self._direction == 1:
            # Growing stopped paying (or hit the cap): try below the best once.
            self._direction = -1
            if (nxt := self._clamp(best // 2)) not in self.rates:
                return self._move_to(nxt)
        return self._move_to(best, settle=True)

    def _move_to(self, budget: int, settle: bool = False) -> None:
        self.budget, self.settled, self._samples = budget, settle, []

    def _clamp(self, budget: int) -> int:
        return max(self.floor, min(self.cap, budget))

    def report(self) -> dict[str, object]:
        """What the tuner knows: the budget in use and the tokens/s measured per budget."""
        return {
            "max_batch_tokens": self.budget,
            "adaptive": self.adaptive,
            "settled": self.settled,
            "cap": self.cap,
            "tokens_per_s": {k: round(v) for k, v in sorted(self.rates.items())},
        }


# Each batch's speed counts this much in the moving average.
PACE_WEIGHT = 0.2


@dataclass
class Pace:
    """Padded tokens per second the encoder reaches (a moving average over batches)."""

    rate: float | None = None

    def observe(self, padded: int, seconds: float) -> None:
        """Record one batch: its padded cost and wall seconds."""
        if padded > 0 and seconds > 0:
            now = padded / seconds
            self.rate = (
                now if self.rate is None else (1 - PACE_WEIGHT) * self.rate + PACE_WEIGHT * now
            )

    def bounded(self, budget: int, seconds: float, floor: int) -> int:
        """``budget``, cut to what encodes in about ``seconds`` at the measured pace (never
        below ``floor``, one full-length text); unchanged until a batch was measured."""
        if self.rate is None:
            return budget
        return max(floor, min(budget, int(self.rate * seconds)))
