"""Baseline K choosers for comparison: off, static K, and a batch-size table (what vLLM and SGLang do today).

None of them observes anything; each returns the same K for every request of a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from policy.stats import IterationStats


class StaticChooser:
    """The same K for every request, always (K = 0 is speculation off)."""

    def __init__(self, num_spec_tokens: int) -> None:
        if num_spec_tokens < 0:
            raise ValueError(f"num_spec_tokens={num_spec_tokens} must be >= 0")
        self.num_spec_tokens = num_spec_tokens

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        return {request_id: self.num_spec_tokens for request_id in request_ids}

    def choose_joined(self, joined: Sequence[str], chosen: Mapping[str, int]) -> dict[str, int]:
        """(`JoinAware`) As `choose` for the whole batch, the joined requests' part."""
        return {r: k for r, k in self.choose([*chosen, *joined]).items() if r not in chosen}

    def observe(self, stats: IterationStats) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass

    def gauges(self) -> dict[str, float]:
        return {}


class OffChooser(StaticChooser):
    """Plain decoding: K = 0 for every request."""

    def __init__(self) -> None:
        super().__init__(0)


@dataclass(frozen=True)
class BatchSizeTableConfig:
    """K by batch size: batches of at most max_batch_sizes[i] requests get num_spec_tokens[i]; larger get 0."""

    max_batch_sizes: tuple[int, ...] = (4, 16, 32, 64)
    num_spec_tokens: tuple[int, ...] = (4, 3, 2, 1)

    def __post_init__(self) -> None:
        if len(self.max_batch_sizes) != len(self.num_spec_tokens) or not self.max_batch_sizes:
            raise ValueError(
                f"max_batch_sizes={self.max_batch_sizes} and num_spec_tokens={self.num_spec_tokens} "
                "must be non-empty and of equal length"
            )
        if list(self.max_batch_sizes) != sorted(set(self.max_batch_sizes)) or self.max_batch_sizes[0] < 1:
            raise ValueError(f"max_batch_sizes={self.max_batch_sizes} must be positive and increasing")
        if min(self.num_spec_tokens) < 0:
            raise ValueError(f"num_spec_tokens={self.num_spec_tokens} must be >= 0")


class BatchSizeTableChooser(StaticChooser):
    """K looked up from the running batch size; no feedback."""

    def __init__(self, config: BatchSizeTableConfig) -> None:
        super().__init__(0)
        self.config = config

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        batch_size = len(request_ids)
        table = zip(self.config.max_batch_sizes, self.config.num_spec_tokens, strict=True)
        k = next((k for max_batch, k in table if batch_size <= max_batch), 0)
        return {request_id: k for request_id in request_ids}
