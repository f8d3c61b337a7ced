"""The expert-parallel group on Ray: same logits as one process for every exchange strategy, the target
engine on top of it, and failures (a killed or frozen rank) surfacing as EPGroupError within the timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.workers.checkpoints import make_checkpoint
from tests.workers.test_expert_parallel import CACHE, assert_same_steps, reference_steps, run_scenario
from workers.expert_parallel import STRATEGIES
from workers.kv_cache import CacheCapacityError
from workers.runner import ModelRunner
from workers.sampling import SamplingParams
from workers.target import Target, VerifyRequest

ray = pytest.importorskip("ray")
from cluster.ep_group import EPGroup, EPGroupConfig, EPGroupError  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return make_checkpoint(tmp_path_factory.mktemp("ep_group"), "Qwen2MoeForCausalLM")  # 6 experts + shared


def _config(path: Path, num_ranks: int, **overrides: Any) -> EPGroupConfig:
    settings: dict[str, Any] = dict(dtype=torch.float32, num_cpus_per_rank=0.5, timeout_s=20.0)
    return EPGroupConfig(str(path), num_ranks, CACHE, **{**settings, **overrides})


@pytest.fixture(scope="module")
def ep2_module(ray_session: Any, qwen_path: Path) -> Iterator[EPGroup]:
    with EPGroup(_config(qwen_path, 2)) as group:
        yield group


@pytest.fixture
def ep2(ep2_module: EPGroup) -> EPGroup:
    """The module's EP = 2 group, rebuilt first if an earlier test broke it (the kill test does)."""
    if not ep2_module.is_usable:
        ep2_module.rebuild()
    return ep2_module


def test_two_ranks_equal_one_for_both_strategies(ep2: EPGroup, qwen_path: Path) -> None:
    expected = reference_steps(qwen_path)
    for strategy in STRATEGIES:
        ep2.set_strategy(strategy)
        assert_same_steps(expected, run_scenario(ep2))


def test_health_memory_and_timing(ep2: EPGroup) -> None:
    health = ep2.health()
    assert [h.rank for h in health] == [0, 1] and health[0].pid != health[1].pid
    sizes = ep2.weight_bytes()
    assert sizes[0].experts == sizes[1].experts > 0  # 3 of the 6 experts each
    assert sizes[0].total == sizes[1].total
    ep2.add_sequence(7)
    _, timings = ep2.forward_timed([7], [[1, 2, 3, 4]])
    ep2.free(7)
    assert len(timings) == 2 and all(0 < t.comm_s < t.total_s for t in timings)


def test_target_engine_drives_the_group(ep2: EPGroup, qwen_path: Path) -> None:
    greedy = SamplingParams(temperature=0.0)
    local = Target(ModelRunner.from_checkpoint(qwen_path, CACHE, dtype=torch.float32))
    remote = Target(ep2)
    assert remote.info == local.info
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    firsts = [t.prefill([1, 2], prompts, [greedy, greedy]).token_ids for t in (local, remote)]
    assert firsts[0] == firsts[1]
    requests = [
        VerifyRequest(1, firsts[0][0], [3, 4, 5], None, greedy),
        VerifyRequest(2, firsts[0][1], [], None, greedy),
    ]
    outs = [t.verify(requests) for t in (local, remote)]
    assert outs[0].committed_ids == outs[1].committed_ids
    assert outs[0].experts_touched == outs[1].experts_touched
    remote.free([1, 2])


def test_invalid_calls_leave_the_group_usable(ep2: EPGroup) -> None:
    ep2.add_sequence(3)
    with pytest.raises(CacheCapacityError, match="max_seq_len is 64"):
        ep2.forward([3], [list(range(65))])
    with pytest.raises(ValueError, match="token id out of range"):  # raised by every rank alike
        ep2.forward([3], [[1000]])
    ep2.free(3)
    assert len(ep2.health()) == 2


def test_killed_rank_fails_the_next_forward_within_the_timeout(ep2: EPGroup) -> None:
    ep2.add_sequence(0)
    ep2.forward([0], [[1, 2, 3]])
    ray.kill(ep2.actors[1])
    start = time.monotonic()
    with pytest.raises(EPGroupError, match="rank 1 died"):
        ep2.forward([0], [[4]])
    assert time.monotonic() - start < ep2.group_config.timeout_s
    with pytest.raises(EPGroupError, match="unusable"):
        ep2.health()
    assert not ep2.is_usable  # the next test using ep2 rebuilds it


@pytest.mark.slow
def test_frozen_rank_fails_within_the_timeout_and_the_group_rebuilds(
    ray_session: Any, qwen_path: Path
) -> None:
    with EPGroup(_config(qwen_path, 2, timeout_s=5.0)) as group:
        group.add_sequence(0)
        group.forward([0], [[1, 2, 3]])
        frozen = group.health()[1].pid
        os.kill(frozen, signal.SIGSTOP)  # a hung rank: alive but silent
        try:
            start = time.monotonic()
            with pytest.raises(EPGroupError, match=r"did not answer within 5 s"):
                group.forward([0], [[4]])
            assert time.monotonic() - start < 5.0 + 3.0
        finally:
            os.kill(frozen, signal.SIGCONT)
        group.rebuild()  # a fresh group: the sequences are gone, prefill again
        assert_same_steps(reference_steps(qwen_path), run_scenario(group))


# -- more ranks, more nodes (slow) -------------------------------------------------------------------------


@pytest.mark.slow
def test_four_ranks_on_fractional_cpus_equal_one(ray_session: Any, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "mixtral", "MixtralForCausalLM")  # 4 experts: one per rank
    expected = reference_steps(path)
    with EPGroup(_config(path, 4, num_cpus_per_rank=0.25)) as group:
        for strategy in STRATEGIES:
            group.set_strategy(strategy)
            assert_same_steps(expected, run_scenario(group))


def two_node_main(path: str) -> None:
    """Two Ray nodes on this machine, one rank on each (STRICT_SPREAD). Runs in its own process: it needs a
    Ray instance of its own, not the session's."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        config = _config(Path(path), 2, num_cpus_per_rank=1.0, bundle_strategy="STRICT_SPREAD")
        with EPGroup(config) as group:
            assert len({h.node_id for h in group.health()}) == 2, "both ranks landed on one node"
            expected = reference_steps(Path(path))
            for strategy in STRATEGIES:
                group.set_strategy(strategy)
                assert_same_steps(expected, run_scenario(group))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_two_nodes_one_rank_each(qwen_path: Path) -> None:
    code = f"from tests.cluster.test_ep_group import two_node_main; two_node_main({str(qwen_path)!r})"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=280)
