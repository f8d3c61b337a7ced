"""Synthetic requests for the simulator: output lengths, and acceptance that changes phase within a request.

Acceptance is fixed per output position (common random numbers): the draft token proposed for position p is
accepted iff uniform[p] < rate[p], whatever K proposed it, so every policy faces the same outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# Acceptance rates that a request's phases draw from, per workload level.
ACCEPTANCE_LEVELS: dict[str, tuple[float, ...]] = {
    "low": (0.2, 0.3, 0.4),
    "medium": (0.5, 0.6, 0.7),
    "high": (0.75, 0.85, 0.9),
    "mixed": (0.05, 0.35, 0.65, 0.9),
}


@dataclass(frozen=True)
class WorkloadConfig:
    batch_size: int  # concurrent requests (the batch cap in open loop)
    acceptance_rates: tuple[float, ...]  # each acceptance phase draws its rate uniformly from these
    mean_phase_tokens: float = 256.0  # phase lengths are geometric with this mean
    mean_output_tokens: int = 512  # output lengths are uniform in [mean / 2, 3 * mean / 2]
    mean_prompt_tokens: int = 128  # prompt lengths likewise (the context the caches hold at the start)
    arrival_rate_per_s: float = 0.0  # Poisson arrivals; 0 = closed loop (a finished request is replaced)
    num_iterations: int = 400
    time_noise: float = 0.02  # relative jitter of each measured phase time
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not self.acceptance_rates or not all(0.0 <= a < 1.0 for a in self.acceptance_rates):
            raise ValueError(f"acceptance_rates={self.acceptance_rates} must be non-empty, each in [0, 1)")
        if self.mean_phase_tokens < 1.0:
            raise ValueError(f"mean_phase_tokens={self.mean_phase_tokens} must be >= 1")
        if self.mean_output_tokens < 2:
            raise ValueError(f"mean_output_tokens={self.mean_output_tokens} must be >= 2")
        if self.mean_prompt_tokens < 2:
            raise ValueError(f"mean_prompt_tokens={self.mean_prompt_tokens} must be >= 2")
        if self.arrival_rate_per_s < 0.0:
            raise ValueError(f"arrival_rate_per_s={self.arrival_rate_per_s} must be >= 0")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations} must be >= 1")
        if not 0.0 <= self.time_noise < 0.5:
            raise ValueError(f"time_noise={self.time_noise} must be in [0, 0.5)")


class SimRequest:
    """One request: its output positions' acceptance rates and draws, how far it has got, and how much of
    its history the drafter holds (it first sees a request when the request first speculates)."""

    def __init__(self, index: int, config: WorkloadConfig, max_spec_tokens: int) -> None:
        rng = np.random.default_rng([config.seed, index])
        self.request_id = f"req-{index}"
        low, high = config.mean_output_tokens // 2, 3 * config.mean_output_tokens // 2
        self.num_output_tokens = int(rng.integers(low, high + 1))
        positions = self.num_output_tokens + max_spec_tokens + 1
        self.rates = _phase_rates(rng, positions, config)
        self.uniforms = rng.random(positions)
        self.num_committed_tokens = 0
        self.num_prompt_tokens = int(
            rng.integers(config.mean_prompt_tokens // 2, 3 * config.mean_prompt_tokens // 2 + 1)
        )
        self.num_drafter_tokens = 0  # history tokens in the drafter's cache

    @property
    def context_len(self) -> int:
        return self.num_prompt_tokens + self.num_committed_tokens

    @property
    def is_finished(self) -> bool:
        return self.num_committed_tokens >= self.num_output_tokens

    @property
    def acceptance_rate(self) -> float:
        """The rate of the current phase (for inspection; policies never see it)."""
        return float(self.rates[self.num_committed_tokens])

    def step(self, num_spec_tokens: int) -> tuple[int, int, int]:
        """Verify K draft tokens from the current position: (accepted, committed after a stop cut, history
        tokens the drafter had to catch up on first)."""
        start = self.num_committed_tokens
        catch_up = 0
        if num_spec_tokens > 0:
            catch_up = self.context_len - self.num_drafter_tokens
        rejected = (
            self.uniforms[start : start + num_spec_tokens] >= self.rates[start : start + num_spec_tokens]
        )
        accepted = int(np.argmax(rejected)) if rejected.any() else num_spec_tokens
        committed = min(accepted + 1, self.num_output_tokens - start)
        self.num_committed_tokens += committed
        if num_spec_tokens > 0:
            self.num_drafter_tokens = self.context_len  # rejected drafts rolled back, the rest kept
        return accepted, committed, catch_up


def _phase_rates(rng: np.random.Generator, num_positions: int, config: WorkloadConfig) -> NDArray[np.float64]:
    """Acceptance rate per position: geometric-length phases, each at a rate drawn from the config."""
    rates = np.empty(num_positions)
    start = 0
    while start < num_positions:
        length = int(rng.geometric(1.0 / config.mean_phase_tokens))
        rates[start : start + length] = config.acceptance_rates[
            int(rng.integers(len(config.acceptance_rates)))
        ]
        start += length
    return rates


class Arrivals:
    """Request arrivals: closed loop (always full) or Poisson in simulated time, capped at the batch size."""

    def __init__(self, config: WorkloadConfig, max_spec_tokens: int) -> None:
        self.config = config
        self.max_spec_tokens = max_spec_tokens
        self._rng = np.random.default_rng([config.seed, -1 % 2**32])
        self._num_arrived = 0
        self._next_arrival_s = self._gap()

    def admit(self, running: list[SimRequest], now_s: float) -> float:
        """Add arrived requests to `running` (up to the batch size); returns the time the batch starts."""
        if self.config.arrival_rate_per_s == 0.0:
            while len(running) < self.config.batch_size:
                running.append(self._new_request())
            return now_s
        if not running:
            now_s = max(now_s, self._next_arrival_s)
        while len(running) < self.config.batch_size and self._next_arrival_s <= now_s:
            running.append(self._new_request())
            self._next_arrival_s += self._gap()
        return now_s

    def _new_request(self) -> SimRequest:
        self._num_arrived += 1
        return SimRequest(self._num_arrived - 1, self.config, self.max_spec_tokens)

    def _gap(self) -> float:
        rate = self.config.arrival_rate_per_s
        return float(self._rng.exponential(1.0 / rate)) if rate > 0.0 else 0.0
