"""Expert parallelism over torch.distributed: attention and dense layers replicated, routed experts split.

Every rank runs the same batch in lockstep and holds identical hidden states between layers; each MoE layer
computes its local experts and the ranks combine the results with one of two exchange strategies:
"allreduce" (every rank routes all tokens, sums partial outputs) or "all_to_all" (dispatch and combine).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Literal, get_args

import msgspec
import torch
import torch.distributed as dist
from torch import nn

from workers.checkpoint import load_model
from workers.config import ModelConfig
from workers.experts import MoEBlock
from workers.kv_cache import CacheConfig
from workers.model import ForwardOutput
from workers.placement import ExpertPlacement
from workers.runner import ModelRunner

Strategy = Literal["allreduce", "all_to_all"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)


class StepTiming(msgspec.Struct, frozen=True):
    """One rank's forward: wall time, and the part spent inside collectives (including waiting for peers)."""

    total_s: float
    comm_s: float

    @property
    def compute_s(self) -> float:
        return self.total_s - self.comm_s


class WeightBytes(msgspec.Struct, frozen=True):
    total: int  # every parameter held by the rank (tied embeddings once)
    experts: int  # of which routed experts


class CommTimer:
    """Accumulates the wall time spent in collectives. (On GPUs, synchronise the stream before reading.)"""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self.seconds += time.perf_counter() - self._start


def check_strategy(strategy: str) -> Strategy:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown exchange strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy


class DistributedMoE(MoEBlock):
    """A MoEBlock holding one rank's experts whose forward returns the full layer output on every rank.

    It adopts the local block's modules (router, local experts, shared expert); nothing is copied.
    """

    def __init__(
        self,
        local: MoEBlock,
        placement: ExpertPlacement,
        rank: int,
        strategy: Strategy,
        timer: CommTimer,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if tuple(local.expert_ids) != placement.experts_of_rank[rank]:
            raise ValueError(
                f"rank {rank} holds experts {local.expert_ids}; the placement gives it "
                f"{list(placement.experts_of_rank[rank])}"
            )
        nn.Module.__init__(self)
        # Adopt the local block's state (router, local experts, shared expert, routing tables): the same
        # modules and parameters, nothing copied or re-initialised.
        self.__dict__.update(local.__dict__)
        self.placement, self.rank, self.group = placement, rank, group
        self.strategy = check_strategy(strategy)
        self.timer = timer
        device = self.gate.weight.device
        self.rank_of_expert = torch.tensor(placement.rank_of_expert, device=device)  # [E]

    def forward(self, x: torch.Tensor, include_shared: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden], identical on every rank -> (full layer output [T, hidden], tokens per expert [E])."""
        if self.placement.num_ranks == 1:
            return super().forward(x, include_shared)
        if self.strategy == "allreduce":
            return self._allreduce(x, include_shared)
        return self._all_to_all(x, include_shared)

    def _allreduce(self, x: torch.Tensor, include_shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Routing is replicated (same x, same router), so every rank knows every expert's token count.
        # The shared expert is added once, on rank 0, before the sum.
        out, tokens_per_expert = super().forward(x, include_shared=include_shared and self.rank == 0)
        with self.timer:
            dist.all_reduce(out, group=self.group)
        return out, tokens_per_expert

    def _all_to_all(self, x: torch.Tensor, include_shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # T = num_tokens, K = top_k, H = hidden, R = num_ranks, E = num_experts.
        # Each rank routes its own contiguous share of the tokens and sends each token once to every rank
        # that owns one of its experts; owners apply their experts and send the weighted sums back.
        num_ranks, hidden = self.placement.num_ranks, x.shape[1]
        share_sizes = [len(s) for s in torch.tensor_split(torch.arange(x.shape[0], device="cpu"), num_ranks)]
        start = sum(share_sizes[: self.rank])
        mine = x[start : start + share_sizes[self.rank]]  # [t, H]
        weights, experts = self.route(mine)  # [t, K]
        is_sent = torch.zeros(mine.shape[0], num_ranks, dtype=torch.bool, device=x.device)
        is_sent.scatter_(1, self.rank_of_expert[experts], True)  # [t, R] token -> owner ranks
        _, token = is_sent.t().nonzero(as_tuple=True)  # [n_send] token of each send, grouped by rank
        send_counts = is_sent.sum(0)  # [R]

        # 1. Counts: row d = (tokens for rank d, this share's tokens per expert) -> summed over sources.
        local_tpe = torch.bincount(experts.flatten(), minlength=self.num_experts)
        meta = torch.cat([send_counts[:, None], local_tpe.expand(num_ranks, -1)], dim=1)  # [R, 1+E]
        recv_meta = torch.empty_like(meta)
        with self.timer:
            dist.all_to_all_single(recv_meta, meta, group=self.group)
        recv_counts, tokens_per_expert = recv_meta[:, 0], recv_meta[:, 1:].sum(0)

        # 2. Dispatch: hidden state, top-k weights and top-k expert ids of each sent token, as raw bytes.
        payload = _pack([mine[token], weights[token], experts[token].to(torch.int32)])
        received = self._exchange(payload, send_counts.tolist(), recv_counts.tolist())
        rx, rw, rids = _unpack(
            received, [(hidden, x.dtype), (self.top_k, x.dtype), (self.top_k, torch.int32)]
        )
        rids = rids.long()
        # Experts held elsewhere have local_row -1 and are skipped: each row is this rank's partial sum.
        counts = torch.bincount(rids.flatten(), minlength=self.num_experts)
        partial = self.experts(rx, rw, rids, counts, self.local_row)  # [n_recv, H]

        # 3. Combine: partial sums go back to the token's rank, which adds them up (+ the shared expert).
        returned = self._exchange(partial, recv_counts.tolist(), send_counts.tolist())  # [n_send, H]
        out = torch.zeros_like(mine).index_add_(0, token, returned)
        if include_shared and self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(mine)) * self.shared_expert(mine)

        # 4. Every rank needs every token's output (attention is replicated): gather the shares.
        return self._gather_shares(out, share_sizes), tokens_per_expert

    def _exchange(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        received = send.new_empty(sum(recv_counts), *send.shape[1:])
        with self.timer:
            dist.all_to_all_single(received, send, recv_counts, send_counts, group=self.group)
        return received

    def _gather_shares(self, share: torch.Tensor, share_sizes: list[int]) -> torch.Tensor:
        padded_len = max(share_sizes)  # all_gather needs equal shapes
        padded = torch.cat([share, share.new_zeros(padded_len - share.shape[0], share.shape[1])])
        gathered = [torch.empty_like(padded) for _ in share_sizes]
        with self.timer:
            dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([g[:n] for g, n in zip(gathered, share_sizes, strict=True)])


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n, c_i] tensors of any dtypes -> one [n, bytes] uint8 tensor (one collective instead of three)."""
    return torch.cat([t.contiguous().view(torch.uint8) for t in tensors], dim=1)


def _unpack(packed: torch.Tensor, columns: Sequence[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
    out, start = [], 0
    for num_columns, dtype in columns:
        width = num_columns * dtype.itemsize
        out.append(packed[:, start : start + width].contiguous().view(dtype))
        start += width
    return out


def choose_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def open_rendezvous(host: str, timeout_s: float) -> dist.TCPStore:
    """The store the ranks meet at, on a free port of `host` (read it from `.port`); keep it alive."""
    return dist.TCPStore(
        host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )


def join_group(
    rank: int,
    num_ranks: int,
    host: str,
    port: int,
    timeout_s: float,
    device: torch.device,
    store: dist.Store | None = None,
) -> None:
    """Initialise the default process group. `timeout_s` bounds every later collective too, so a rank whose
    peer died or hangs raises instead of waiting forever."""
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    dist.init_process_group(
        choose_backend(device), store=store, rank=rank, world_size=num_ranks, timeout=timeout
    )


class EPWorker(ModelRunner):
    """One expert-parallel rank: a ModelRunner without other ranks' experts, whose MoE layers combine
    partial results across the group. With num_ranks > 1, call `join_group` first; every rank must then
    receive the same calls in the same order (the collectives inside forward pair up across ranks)."""

    def __init__(
        self,
        checkpoint: str | Path,
        cache_config: CacheConfig,
        placement: ExpertPlacement,
        rank: int,
        strategy: Strategy = "allreduce",
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        config = ModelConfig.from_dir(checkpoint)
        if config.num_experts != placement.num_experts:
            raise ValueError(
                f"the placement is for {placement.num_experts} experts; {checkpoint} has {config.num_experts}"
            )
        if not 0 <= rank < placement.num_ranks:
            raise ValueError(f"rank {rank} is outside 0..{placement.num_ranks - 1}")
        if placement.num_ranks > 1 and (
            not dist.is_initialized() or dist.get_world_size() != placement.num_ranks
        ):
            raise RuntimeError(f"join a process group of {placement.num_ranks} ranks (join_group) first")
        experts = placement.experts_of_rank[rank]
        model = load_model(checkpoint, dtype, max_positions=cache_config.max_seq_len, expert_ids=experts)
        super().__init__(model.to(device), cache_config)
        self.rank = rank
        self.timer = CommTimer()
        self.moe_layers: list[DistributedMoE] = []
        for layer in self.model.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp = DistributedMoE(layer.mlp, placement, rank, strategy, self.timer)
                self.moe_layers.append(layer.mlp)
        self.last_timing = StepTiming(0.0, 0.0)

    def forward(
        self,
        seq_ids: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        logits_for: Literal["all", "last"] = "all",
    ) -> ForwardOutput:
        comm_before, start = self.timer.seconds, time.perf_counter()
        out = super().forward(seq_ids, token_ids, logits_for)
        self.last_timing = StepTiming(time.perf_counter() - start, self.timer.seconds - comm_before)
        return out

    def set_strategy(self, strategy: Strategy) -> None:
        for layer in self.moe_layers:
            layer.strategy = check_strategy(strategy)

    def check_collective(self) -> None:
        """A one-element all_reduce across the group; raises if a peer is gone (within the timeout)."""
        if dist.is_initialized():
            ones = torch.ones(1, device=self.device)
            dist.all_reduce(ones)
            if int(ones.item()) != dist.get_world_size():
                raise RuntimeError(f"rank {self.rank}: health all_reduce gave {ones.item()}")

    def weight_bytes(self) -> WeightBytes:
        def size(params: Iterable[torch.nn.Parameter]) -> int:
            return sum(p.numel() * p.element_size() for p in params)

        experts = size(p for layer in self.moe_layers for p in layer.experts.parameters())
        return WeightBytes(total=size(self.model.parameters()), experts=experts)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
