"""An expert-parallel group on Ray: one actor per rank in a placement group, driven in lockstep.

`EPGroup` is the coordinator and has ModelRunner's API (forward / add_sequence / rollback / free / config /
cache), so `workers.target.Target` can drive it. Every call reaches all ranks with identical arguments and
waits at most `timeout_s`: a rank that dies or hangs becomes an `EPGroupError` naming it, never a silent
hang; the group is then broken until `rebuild()` (KV caches are lost: prefill the sequences again).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.config import ModelConfig
from workers.expert_parallel import (
    EPWorker,
    StepTiming,
    Strategy,
    WeightBytes,
    check_strategy,
    join_group,
    open_rendezvous,
)
from workers.kv_cache import CacheConfig, KVCache
from workers.model import ForwardOutput
from workers.placement import ExpertPlacement

BUNDLE_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def assigned_device() -> torch.device:
    """Where this Ray worker process runs its model: the GPU Ray gave it (visible as cuda:0), else the CPU."""
    return torch.device("cuda" if ray.get_gpu_ids() else "cpu")


class EPGroupError(RuntimeError):
    """A rank died, hung past the timeout or diverged from the others; the group must be rebuilt."""


@dataclass(frozen=True)
class EPGroupConfig:
    checkpoint: str  # a path every node can read
    num_ranks: int
    cache: CacheConfig = field(default_factory=CacheConfig)
    placement: ExpertPlacement | None = None  # None: contiguous blocks of experts
    strategy: Strategy = "allreduce"
    dtype: torch.dtype | None = None  # None: the checkpoint's dtype
    num_cpus_per_rank: float = 1.0  # fractional is fine (more ranks than cores in tests)
    use_gpus: bool | None = None  # one GPU per rank; None: when the cluster has a GPU for every rank
    num_threads_per_rank: int = 1  # torch threads in each rank's process
    bundle_strategy: str = "PACK"  # STRICT_SPREAD puts every rank on its own node
    timeout_s: float = 30.0  # bound on every call and on every collective inside a rank
    start_timeout_s: float = 180.0  # placing the bundles, starting processes, loading weights

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {self.num_ranks}")
        if self.placement is not None and self.placement.num_ranks != self.num_ranks:
            raise ValueError(
                f"the placement has {self.placement.num_ranks} ranks, num_ranks={self.num_ranks}"
            )
        if self.bundle_strategy not in BUNDLE_STRATEGIES:
            raise ValueError(f"bundle_strategy {self.bundle_strategy!r}: choose one of {BUNDLE_STRATEGIES}")
        if self.timeout_s <= 0 or self.start_timeout_s <= 0 or self.num_cpus_per_rank <= 0:
            raise ValueError("timeouts and num_cpus_per_rank must be positive")
        check_strategy(self.strategy)


class CacheOp(msgspec.Struct, frozen=True):
    """A KV-cache change queued on the coordinator and shipped to the ranks with the next forward."""

    kind: Literal["add", "free", "rollback"]
    seq_id: int
    num_tokens: int = 0


class RankHealth(msgspec.Struct, frozen=True):
    rank: int
    node_id: str
    pid: int


class _Rank:
    """The body of one rank's actor (`ray.remote` is applied in EPGroup)."""

    def __init__(self, rank: int, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        self.rank = rank
        self.worker: EPWorker | None = None
        self._store: torch.distributed.Store | None = None  # rank 0 hosts the rendezvous

    def open_rendezvous(self, timeout_s: float) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        store = open_rendezvous(host, timeout_s)
        self._store = store
        return host, store.port

    def start(self, config: EPGroupConfig, host: str, port: int) -> tuple[ModelConfig, ExpertPlacement]:
        placement = config.placement or ExpertPlacement.contiguous(
            ModelConfig.from_dir(config.checkpoint).num_experts, config.num_ranks
        )
        device = assigned_device()  # NCCL between GPU ranks, gloo between CPU ones
        join_group(self.rank, config.num_ranks, host, port, config.timeout_s, device, self._store)
        self.worker = EPWorker(
            config.checkpoint, config.cache, placement, self.rank, config.strategy, config.dtype, device
        )
        return self.worker.config, placement

    def forward(
        self, ops: list[CacheOp], seq_ids: list[int], token_ids: list[list[int]], logits_for: str
    ) -> tuple[ForwardOutput | None, StepTiming]:
        worker = self._worker()
        self.apply(ops)
        # Only rank 0's logits are used: the other ranks compute one row per sequence and return none.
        out = worker.forward(seq_ids, token_ids, "all" if logits_for == "all" and self.rank == 0 else "last")
        if self.rank != 0:
            return None, worker.last_timing
        host_out = ForwardOutput(out.logits.cpu(), out.tokens_per_expert.cpu())  # the coordinator is a CPU
        return host_out, worker.last_timing

    def apply(self, ops: list[CacheOp]) -> None:
        worker = self._worker()
        for op in ops:
            if op.kind == "add":
                worker.add_sequence(op.seq_id)
            elif op.kind == "free":
                worker.free(op.seq_id)
            else:
                worker.rollback(op.seq_id, op.num_tokens)

    def set_strategy(self, strategy: Strategy) -> None:
        self._worker().set_strategy(strategy)

    def health(self) -> RankHealth:
        self._worker().check_collective()
        return RankHealth(self.rank, ray.get_runtime_context().get_node_id(), os.getpid())

    def weight_bytes(self) -> WeightBytes:
        return self._worker().weight_bytes()

    def _worker(self) -> EPWorker:
        if self.worker is None:
            raise RuntimeError(f"rank {self.rank} was not started")
        return self.worker


class EPGroup:
    def __init__(self, group_config: EPGroupConfig) -> None:
        self.group_config = group_config
        self._pg: PlacementGroup | None = None
        self._actors: list[Any] = []
        self._broken: str | None = "not started"
        self._start()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.group_config
        use_gpus = cfg.use_gpus
        if use_gpus is None:
            use_gpus = ray.cluster_resources().get("GPU", 0) >= cfg.num_ranks
        bundle = {"CPU": cfg.num_cpus_per_rank, **({"GPU": 1.0} if use_gpus else {})}
        self._pg = placement_group([bundle] * cfg.num_ranks, strategy=cfg.bundle_strategy)
        self._broken = None
        try:
            try:
                ray.get(self._pg.ready(), timeout=cfg.start_timeout_s)
            except GetTimeoutError:
                raise EPGroupError(
                    f"could not place {cfg.num_ranks} bundles {bundle} ({cfg.bundle_strategy}) within "
                    f"{cfg.start_timeout_s:g} s; the cluster has {ray.available_resources()} available"
                ) from None
            actor_cls = ray.remote(_Rank)
            self._actors = [
                actor_cls.options(
                    num_cpus=cfg.num_cpus_per_rank,
                    num_gpus=1 if use_gpus else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._pg, placement_group_bundle_index=r
                    ),
                ).remote(r, cfg.num_threads_per_rank)
                for r in range(cfg.num_ranks)
            ]
            [(host, port)] = self._gather(
                [self._actors[0].open_rendezvous.remote(cfg.start_timeout_s)],
                "rendezvous",
                cfg.start_timeout_s,
            )
            started = self._gather(
                [a.start.remote(cfg, host, port) for a in self._actors], "start", cfg.start_timeout_s
            )
        except BaseException:
            self.shutdown()
            raise
        self.config, self.placement = started[0]
        # Mirror of the ranks' slots and lengths (no tensors): validates calls before any rank sees them.
        self.cache = KVCache(cfg.cache, num_layers=0, num_kv_heads=1, head_dim=1, dtype=torch.float32)
        self._pending: list[CacheOp] = []

    def shutdown(self) -> None:
        """Kill every rank and free the placement group. Safe to call twice."""
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        self._broken = "shut down"

    def rebuild(self) -> None:
        """A fresh group on the same config (after an EPGroupError): every sequence must be added again."""
        self.shutdown()
        self._start()

    def __enter__(self) -> EPGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    @property
    def actors(self) -> list[Any]:
        return list(self._actors)

    @property
    def is_usable(self) -> bool:
        """False after an EPGroupError or shutdown(), until rebuild()."""
        return self._broken is None

    # -- the ModelRunner API ---------------------------------------------------------------------------------

    def add_sequence(self, seq_id: int) -> None:
        self.cache.add(seq_id)
        self._pending.append(CacheOp("add", seq_id))

    def free(self, seq_id: int) -> None:
        if seq_id in self.cache:
            self.cache.free(seq_id)
            self._pending.append(CacheOp("free", seq_id))

    def rollback(self, seq_id: int, num_tokens: int) -> None:
        self.cache.rollback(seq_id, num_tokens)
        self._pending.append(CacheOp("rollback", seq_id, num_tokens))

    def seq_len(self, seq_id: int) -> int:
        return self.cache.length(seq_id)

    def forward(
        self,
        seq_ids: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        logits_for: Literal["all", "last"] = "all",
    ) -> ForwardOutput:
        return self.forward_timed(seq_ids, token_ids, logits_for)[0]

    def forward_timed(
        self,
        seq_ids: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        logits_for: Literal["all", "last"] = "all",
    ) -> tuple[ForwardOutput, list[StepTiming]]:
        """The forward, with every rank's time split into compute and communication."""
        seq_ids, token_ids = list(seq_ids), [list(t) for t in token_ids]
        num_new = [len(t) for t in token_ids]
        self.cache.check_fits(seq_ids, num_new)
        ops, self._pending = self._pending, []  # the ranks apply queued cache changes first
        results = self._call_all("forward", ops, seq_ids, token_ids, logits_for)
        self.cache.advance(seq_ids, num_new)
        out = results[0][0]
        assert out is not None
        return out, [timing for _, timing in results]

    # -- group-wide ------------------------------------------------------------------------------------------

    def set_strategy(self, strategy: Strategy) -> None:
        self._call_all("set_strategy", check_strategy(strategy))

    def health(self) -> list[RankHealth]:
        """Every rank answers and a collective completes, within the timeout; else EPGroupError."""
        return self._call_all("health")

    def weight_bytes(self) -> list[WeightBytes]:
        return self._call_all("weight_bytes")

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        if self._broken is not None:
            raise EPGroupError(f"the expert-parallel group is unusable ({self._broken}); call rebuild()")
        refs = [getattr(actor, method).remote(*args) for actor in self._actors]
        return self._gather(refs, method, self.group_config.timeout_s)

    def _gather(self, refs: list[ray.ObjectRef], what: str, timeout_s: float) -> list[Any]:
        """Results in rank order. A dead rank raises at once; a silent one when the timeout expires."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        failures: dict[int, RayTaskError] = {}
        pending, deadline = list(refs), time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                silent = sorted(rank_of[ref] for ref in pending)
                raise self._break(f"{what}: rank(s) {silent} did not answer within {timeout_s:g} s")
            rank = rank_of[ready[0]]
            try:
                results[rank] = ray.get(ready[0])
            except RayActorError as err:
                raise self._break(f"{what}: rank {rank} died ({type(err).__name__})") from err
            except RayTaskError as err:
                failures[rank] = err
        if failures:
            first = failures[min(failures)]
            # The same validation error on every rank, raised before any collective: the group is intact.
            if len(failures) == len(refs) and isinstance(first.cause, ValueError | KeyError):
                raise first.as_instanceof_cause()
            raise self._break(f"{what}: rank(s) {sorted(failures)} failed: {first.cause!r}") from first
        return results

    def _break(self, reason: str) -> EPGroupError:
        self._broken = reason
        return EPGroupError(f"expert-parallel group: {reason}; rebuild the group and prefill again")
