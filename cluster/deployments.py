"""The model-hosting deployments and the proxies the router's engine drives them through.

`TargetServer` hosts the MoE target (one replica = one expert-parallel group) and `DrafterServer` the draft
model; each holds the KV caches of the sequences its router sends it. Plain classes: `app.py` applies
`serve.deployment`. `RemoteTarget` / `RemoteDrafter` give the engine the same interface as the local
`Target` / `Drafter`, over Serve handles.

Binding: an app has one Router, one Drafter and one MoETarget deployment, each with one replica, so every
call about a sequence reaches the replica holding its cache. Scale out with more apps (one per group).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cluster.config import REPO_ROOT, AppConfig
from workers.drafter import Drafter, DraftOutput, DraftRequest
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner
from workers.sampling import SamplingParams
from workers.target import Target, TargetInfo, VerifyOutput, VerifyRequest

logger = logging.getLogger(__name__)
CALL_TIMEOUT_S = 60.0


def resolve_model_path(path: str) -> Path:
    """A model path as given, or relative to the repository (the demo checkpoints ship there)."""
    candidate = Path(path)
    if candidate.is_dir():
        return candidate
    in_repo = REPO_ROOT / path
    if in_repo.is_dir():
        return in_repo
    raise ValueError(f"model directory {path!r} does not exist")


def _dtype(name: str) -> torch.dtype | None:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(name)


def load_runner(path: str, config: AppConfig, extra_positions: int = 0) -> ModelRunner:
    torch.set_num_threads(config.resources.torch_threads)
    cache = CacheConfig(
        max_seqs=config.model.max_seqs, max_seq_len=config.model.max_seq_len + extra_positions
    )
    logger.info("loading %s", path)
    return ModelRunner.from_checkpoint(resolve_model_path(path), cache, dtype=_dtype(config.model.dtype))


class TargetServer:
    def __init__(self, config: AppConfig) -> None:
        # Room for max_spec_tokens + 1 verification tokens beyond the longest sequence.
        self.target = Target(load_runner(config.model.target, config, config.engine.max_spec_tokens + 1))

    def info(self) -> TargetInfo:
        return self.target.info

    def prefill(
        self, seq_ids: list[int], prompts: list[list[int]], params: list[SamplingParams]
    ) -> list[int]:
        return self.target.prefill(seq_ids, prompts, params)

    def verify(self, requests: list[VerifyRequest]) -> VerifyOutput:
        return self.target.verify(requests)

    def free(self, seq_ids: list[int]) -> None:
        self.target.free(seq_ids)

    def num_used_slots(self) -> int:
        return self.target.runner.cache.num_used_slots


class DrafterServer:
    def __init__(self, config: AppConfig) -> None:
        assert config.model.draft is not None
        self.drafter = Drafter(load_runner(config.model.draft, config, config.engine.max_spec_tokens + 1))

    def vocab_size(self) -> int:
        return self.drafter.vocab_size

    def propose(self, requests: list[DraftRequest]) -> DraftOutput:
        return self.drafter.propose(requests)

    def free(self, seq_ids: list[int]) -> None:
        self.drafter.free(seq_ids)

    def num_used_slots(self) -> int:
        return self.drafter.runner.cache.num_used_slots


class RemoteTarget:
    """The engine's Target, over a Serve handle to a TargetServer (blocking calls from the loop thread)."""

    def __init__(self, handle: Any, info: TargetInfo) -> None:
        self.handle = handle
        self.info = info

    def prefill(
        self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[int]:
        result: list[int] = self.handle.prefill.remote(
            list(seq_ids), [list(p) for p in prompts], list(params)
        ).result(timeout_s=CALL_TIMEOUT_S)
        return result

    def verify(self, requests: Sequence[VerifyRequest]) -> VerifyOutput:
        result: VerifyOutput = self.handle.verify.remote(list(requests)).result(timeout_s=CALL_TIMEOUT_S)
        return result

    def free(self, seq_ids: Sequence[int]) -> None:
        self.handle.free.remote(list(seq_ids)).result(timeout_s=CALL_TIMEOUT_S)


class RemoteDrafter:
    """The engine's Drafter, over a Serve handle to a DrafterServer. Failures reach the engine, which then
    continues at K = 0 (see SpecEngine._draft)."""

    def __init__(self, handle: Any, vocab_size: int, timeout_s: float = 5.0) -> None:
        self.handle = handle
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s

    def propose(self, requests: Sequence[DraftRequest]) -> DraftOutput:
        result: DraftOutput = self.handle.propose.remote(list(requests)).result(timeout_s=self.timeout_s)
        return result

    def free(self, seq_ids: Sequence[int]) -> None:
        self.handle.free.remote(list(seq_ids)).result(timeout_s=self.timeout_s)
