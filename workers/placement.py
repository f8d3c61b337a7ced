"""Expert placement: which routed experts live on which expert-parallel rank.

Invariant (checked at construction): every expert 0..num_experts-1 is placed exactly once and every rank
holds at least one expert. The same plan applies to every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    num_ranks: int
    experts_of_rank: tuple[tuple[int, ...], ...]  # [num_ranks] global expert ids held by each rank

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {self.num_ranks}")
        if len(self.experts_of_rank) != self.num_ranks:
            raise ValueError(
                f"experts_of_rank lists {len(self.experts_of_rank)} ranks but num_ranks={self.num_ranks}"
            )
        owner: dict[int, int] = {}
        for rank, experts in enumerate(self.experts_of_rank):
            if not experts:
                raise ValueError(f"rank {rank} holds no experts; give every rank at least one")
            for expert in experts:
                if not 0 <= expert < self.num_experts:
                    raise ValueError(f"rank {rank} holds expert {expert}, outside 0..{self.num_experts - 1}")
                if expert in owner:
                    raise ValueError(f"expert {expert} is placed twice: on rank {owner[expert]} and {rank}")
                owner[expert] = rank
        unplaced = sorted(set(range(self.num_experts)) - set(owner))
        if unplaced:
            raise ValueError(f"experts {unplaced} are not placed on any rank")

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> ExpertPlacement:
        """Rank r holds experts [r*n, (r+1)*n) with n = num_experts / num_ranks."""
        if num_ranks < 1 or num_experts % num_ranks != 0:
            raise ValueError(
                f"{num_experts} experts do not divide evenly over {num_ranks} ranks; choose a number of "
                "ranks that divides the experts, or pass an explicit ExpertPlacement"
            )
        n = num_experts // num_ranks
        return cls(num_experts, num_ranks, tuple(tuple(range(r * n, (r + 1) * n)) for r in range(num_ranks)))

    @cached_property
    def rank_of_expert(self) -> tuple[int, ...]:
        """[num_experts] the rank that holds each expert."""
        owner = [0] * self.num_experts
        for rank, experts in enumerate(self.experts_of_rank):
            for expert in experts:
                owner[expert] = rank
        return tuple(owner)
