"""Every gauge the served choosers report is declared in cluster/metrics.py (an undeclared one made the
Serve app answer /metrics with a 500: the test budget's gauge, session 10)."""

from __future__ import annotations

import pytest

from cluster.choosers import make_chooser
from cluster.config import PolicySettings
from cluster.metrics import GAUGES
from policy.guard import MeasuredGuard
from workers.target import TargetInfo

INFO = TargetInfo(vocab_size=64, eos_token_ids=(), num_experts=8, top_k=2, max_seqs=8, max_seq_len=256)


@pytest.mark.parametrize("kind", ["auto", "cascade"])
def test_every_chooser_gauge_is_declared(kind: str) -> None:
    guarded = MeasuredGuard(make_chooser(PolicySettings(kind=kind), INFO, 4))
    guarded.choose(["a", "b"])
    names = set(guarded.gauges())
    assert names and names <= set(GAUGES), names - set(GAUGES)
