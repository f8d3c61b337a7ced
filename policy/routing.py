"""Expected distinct experts touched by a forward over t tokens: N(t).

Uniform top-k routing gives N(t) = E * (1 - (1 - top_k/E)^t). Real routing is correlated, so measured
unions are lower; `ExpertCounts` keeps the measured means per token count and corrects the formula with them.
A dense target (num_experts = 0) touches no experts: N(t) = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


def expected_experts(num_tokens: ArrayLike, num_experts: int, top_k: int) -> NDArray[np.float64]:
    """N(t) per MoE layer under uniform top-k routing, elementwise over `num_tokens`."""
    tokens = np.asarray(num_tokens, dtype=np.float64)
    if num_experts == 0:
        return np.zeros_like(tokens)
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def saturation_tokens(num_experts: int, top_k: int, tau: float = 0.95) -> int:
    """Fewest tokens t with N(t) >= tau * E (11 for 8 experts top-2, 23 for 64 experts top-8)."""
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau={tau} must be in (0, 1)")
    if top_k >= num_experts:
        return 1
    return math.ceil(math.log(1.0 - tau) / math.log(1.0 - top_k / num_experts))


@dataclass(frozen=True)
class RoutingConfig:
    num_experts: int  # experts per MoE layer (0 for a dense target)
    top_k: int  # experts each token routes to
    min_samples: int = 4  # measurements at a token count before they replace the formula there

    def __post_init__(self) -> None:
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} must be >= 0 (0 means a dense target)")
        if self.num_experts > 0 and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.min_samples < 1:
            raise ValueError(f"min_samples={self.min_samples} must be >= 1")


class ExpertCounts:
    """N(t): the uniform formula, corrected by measured distinct-expert counts where there are any.

    At a token count with enough measurements the measured mean is used; elsewhere the formula is scaled by
    the measured/formula ratio interpolated between the nearest measured token counts.
    """

    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self._sums: dict[int, float] = {}
        self._counts: dict[int, int] = {}
        self._correction: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None  # (tokens, ratios)

    def record(self, num_tokens: int, experts_touched: float) -> None:
        """One forward over `num_tokens` tokens touched `experts_touched` experts (mean over layers)."""
        if num_tokens < 1 or self.config.num_experts == 0:
            return
        self._sums[num_tokens] = self._sums.get(num_tokens, 0.0) + experts_touched
        self._counts[num_tokens] = self._counts.get(num_tokens, 0) + 1
        self._correction = None

    def predict(self, num_tokens: ArrayLike) -> NDArray[np.float64]:
        uniform = expected_experts(num_tokens, self.config.num_experts, self.config.top_k)
        if self._correction is None:
            self._correction = self._measured_ratios()
        xs, ratios = self._correction
        if len(xs) == 0:
            return uniform
        # np.interp holds the end ratios constant outside the measured range.
        return uniform * np.interp(np.asarray(num_tokens, dtype=np.float64), xs, ratios)

    def _measured_ratios(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Measured mean / uniform formula at each token count with enough measurements."""
        measured = sorted(t for t, n in self._counts.items() if n >= self.config.min_samples)
        xs = np.array(measured, dtype=np.float64)
        means = np.array([self._sums[t] / self._counts[t] for t in measured])
        return xs, means / expected_experts(xs, self.config.num_experts, self.config.top_k)
