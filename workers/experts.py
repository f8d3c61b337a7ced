"""The MoE layer: route each token to top_k experts, then run each touched expert once on its tokens.

Grouping tokens by expert makes the layer's cost follow the number of distinct experts touched (the
quantity the policy's cost model is built on), and the per-expert token counts are returned for it.
An instance may hold only some experts (`expert_ids`, for expert parallelism): it then returns the partial
sum over its own experts, and the caller combines partial sums across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workers.config import ModelConfig
from workers.layers import SwiGLU


class MoEBlock(nn.Module):
    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.norm_topk_prob = config.norm_topk_prob
        self.expert_ids = list(range(config.num_experts)) if expert_ids is None else list(expert_ids)
        # local_row[e] = row of expert e in the stacked weights, -1 when it lives on another rank.
        self.local_row = [-1] * config.num_experts
        for row, expert in enumerate(self.expert_ids):
            self.local_row[expert] = row
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        num_local = len(self.expert_ids)
        self.gate = nn.Linear(hidden, config.num_experts, bias=False)  # the router
        self.experts = _StackedExperts(num_local, hidden, inter)
        self.shared_expert: SwiGLU | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(hidden, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> (weights [T, top_k] in x's dtype, expert ids [T, top_k])."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor, include_shared: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> (output [T, hidden], tokens per expert [E]) for the experts held here."""
        weights, experts = self.route(x)
        tokens_per_expert = torch.bincount(experts.flatten(), minlength=self.num_experts)  # [E]
        out = self.experts(x, weights, experts, tokens_per_expert, self.local_row)
        if include_shared and self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out, tokens_per_expert


class _StackedExperts(nn.Module):
    """Routed experts' weights stacked: gate_up_proj [E_local, 2*I, H], down_proj [E_local, H, I]."""

    def __init__(self, num_local: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden, inter))

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        experts: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        local_row: list[int],
    ) -> torch.Tensor:
        # T = num_tokens, K = top_k. Sort the T*K (token, expert) pairs by expert so that each expert's
        # tokens are one contiguous run; then one matmul pair per touched expert.
        top_k = experts.shape[1]
        order = torch.argsort(experts.flatten(), stable=True)  # [T*K]
        token_of_pair = order // top_k
        weight_of_pair = weights.flatten()[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(tokens_per_expert.tolist()):
            if count == 0:
                continue
            end = start + count
            row = local_row[expert]
            if row >= 0:
                tokens = token_of_pair[start:end]
                gate, up = F.linear(x[tokens], self.gate_up_proj[row]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, self.down_proj[row])
                out.index_add_(0, tokens, y * weight_of_pair[start:end, None])
            start = end
        return out
