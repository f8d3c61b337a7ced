"""What the engine needs of its models: a target and a drafter, local (`workers.target.Target`,
`workers.drafter.Drafter`) or proxies to remote ones (`cluster.deployments`)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol

from workers.drafter import DraftOutput, DraftRequest
from workers.sampling import SamplingParams
from workers.target import PrefillOutput, TargetInfo, VerifyOutput, VerifyRequest


class TargetBackend(Protocol):
    """What the engine needs of a target: `workers.target.Target`, or a proxy to a remote one."""

    @property
    def info(self) -> TargetInfo: ...
    def prefill(
        self, seq_ids: Seq[int], prompts: Seq[Seq[int]], params: Seq[SamplingParams]
    ) -> PrefillOutput: ...
    def verify(self, requests: Seq[VerifyRequest]) -> VerifyOutput: ...
    def restore(self, seq_ids: Seq[int], token_ids: Seq[Seq[int]], params: Seq[SamplingParams]) -> None: ...
    def free(self, seq_ids: Seq[int]) -> None: ...


class DraftBackend(Protocol):
    """What the engine needs of a drafter: `workers.drafter.Drafter`, or a proxy to a remote one."""

    @property
    def vocab_size(self) -> int: ...
    def propose(self, requests: Seq[DraftRequest]) -> DraftOutput: ...
    def free(self, seq_ids: Seq[int]) -> None: ...
