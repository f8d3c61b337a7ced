"""Expert placement validation, and expert-parallel ranks (torch.multiprocessing + gloo, no Ray) against
the unsharded runner: same logits and expert counts for prefill, decode and ragged verification."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.workers.checkpoints import make_checkpoint
from tests.workers.device_watch import RequireDevice
from workers.expert_parallel import STRATEGIES, EPWorker, join_group, open_rendezvous
from workers.kv_cache import CacheConfig
from workers.model import ForwardOutput
from workers.placement import ExpertPlacement
from workers.runner import ModelRunner, Runner

CACHE = CacheConfig(max_seqs=8, max_seq_len=64)
Step = tuple[torch.Tensor, torch.Tensor]  # (logits, tokens_per_expert) of one forward


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_scenario(runner: Runner) -> list[Step]:
    """Ragged prefill, decode, ragged verification (K = 0, 2, 4, 1), rollback, and a one-token batch
    (fewer tokens than ranks: some ranks get no tokens to dispatch); frees its sequences at the end."""
    for seq_id in range(4):
        runner.add_sequence(seq_id)
    feeds: list[tuple[list[int], list[list[int]], Literal["all", "last"]]] = [
        ([0, 1, 2, 3], [_tokens(n, seed) for seed, n in enumerate([5, 11, 3, 8])], "all"),  # prefill
        ([0, 1, 2, 3], [_tokens(1, 10 + i) for i in range(4)], "all"),  # decode
        ([2, 0, 3, 1], [_tokens(n, 20 + n) for n in [1, 3, 5, 2]], "all"),  # verification, K + 1 each
    ]
    steps = [_step(runner.forward(*feed)) for feed in feeds]
    runner.rollback(0, 2)
    runner.rollback(3, 4)
    steps.append(_step(runner.forward([3, 0], [_tokens(2, 30), _tokens(1, 31)], "last")))
    steps.append(_step(runner.forward([1], [_tokens(1, 40)])))
    for seq_id in range(4):
        runner.free(seq_id)
    return steps


def _step(out: ForwardOutput) -> Step:
    return out.logits.clone(), out.tokens_per_expert.clone()


def assert_same_steps(expected: list[Step], actual: list[Step]) -> None:
    assert len(expected) == len(actual)
    for i, ((ref_logits, ref_counts), (logits, counts)) in enumerate(zip(expected, actual, strict=True)):
        tolerance = 1e-4 * max(1.0, float(ref_logits.abs().max()))
        assert logits.shape == ref_logits.shape, f"step {i}"
        assert (logits - ref_logits).abs().max() < tolerance, f"step {i}"
        assert torch.equal(counts, ref_counts), f"step {i}: tokens per expert differ"


def reference_steps(path: Path) -> list[Step]:
    return run_scenario(ModelRunner.from_checkpoint(path, CACHE, dtype=torch.float32))


# -- placement ---------------------------------------------------------------------------------------------


def test_contiguous_placement() -> None:
    plan = ExpertPlacement.contiguous(8, 4)
    assert plan.experts_of_rank == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert plan.rank_of_expert == (0, 0, 1, 1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match="6 experts do not divide evenly over 4 ranks"):
        ExpertPlacement.contiguous(6, 4)


def test_explicit_uneven_placement_is_allowed() -> None:
    plan = ExpertPlacement(6, 4, ((0, 5), (1, 4), (2,), (3,)))
    assert plan.rank_of_expert == (0, 1, 2, 3, 1, 0)


@pytest.mark.parametrize(
    ("experts_of_rank", "message"),
    [
        (((0, 1), (1, 2, 3)), "expert 1 is placed twice: on rank 0 and 1"),
        (((0, 1), (2,)), r"experts \[3\] are not placed"),
        (((0, 1), (2, 3, 4)), "rank 1 holds expert 4, outside 0..3"),
        (((0, 1, 2, 3), ()), "rank 1 holds no experts"),
        (((0, 1, 2, 3),), "lists 1 ranks but num_ranks=2"),
    ],
)
def test_invalid_placement_names_the_problem(
    experts_of_rank: tuple[tuple[int, ...], ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ExpertPlacement(4, 2, experts_of_rank)


# -- ranks in processes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")  # here, not at import: spawned ranks import this module
    root = tmp_path_factory.mktemp("ep")
    return {
        "mixtral": make_checkpoint(root / "mixtral", "MixtralForCausalLM"),  # 4 experts, top-2
        "qwen2moe": make_checkpoint(root / "qwen2moe", "Qwen2MoeForCausalLM"),  # 6 experts + shared expert
    }


def test_single_rank_worker_equals_runner(checkpoints: dict[str, Path]) -> None:
    worker = EPWorker(
        checkpoints["qwen2moe"], CACHE, ExpertPlacement.contiguous(6, 1), 0, dtype=torch.float32
    )
    assert_same_steps(reference_steps(checkpoints["qwen2moe"]), run_scenario(worker))
    with pytest.raises(ValueError, match="placement is for 4 experts"):
        EPWorker(checkpoints["qwen2moe"], CACHE, ExpertPlacement.contiguous(4, 1), 0)


def _rank_main(rank: int, port: int, cases: list[tuple[str, ExpertPlacement]], out_dir: str) -> None:
    torch.set_num_threads(1)
    num_ranks = cases[0][1].num_ranks
    join_group(rank, num_ranks, "127.0.0.1", port, timeout_s=60, device=torch.device("cpu"))
    results = {}
    for path, placement in cases:
        for strategy in STRATEGIES:
            worker = EPWorker(path, CACHE, placement, rank, strategy, dtype=torch.float32)
            with RequireDevice() as watch:  # no tensor left on the CPU when the ranks run on GPUs
                results[(path, strategy)] = run_scenario(worker)
            results[(path, "created without a device")] = watch.missing
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _run_ranks(
    cases: list[tuple[str, ExpertPlacement]], tmp_path: Path
) -> list[dict[tuple[str, str], list[Step]]]:
    num_ranks = cases[0][1].num_ranks
    store = open_rendezvous("127.0.0.1", timeout_s=60)  # the ranks meet here; kept alive until they finish
    mp.spawn(_rank_main, args=(store.port, cases, str(tmp_path)), nprocs=num_ranks)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(num_ranks)]


@pytest.mark.timeout(180)
def test_two_ranks_equal_one_for_both_strategies(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        (str(checkpoints["mixtral"]), ExpertPlacement.contiguous(4, 2)),
        (str(checkpoints["qwen2moe"]), ExpertPlacement(6, 2, ((0, 2, 4), (1, 3, 5)))),  # interleaved
    ]
    per_rank = _run_ranks(cases, tmp_path)
    for path, _ in cases:
        assert all(not r[(path, "created without a device")] for r in per_rank), per_rank
        expected = reference_steps(Path(path))
        for strategy in STRATEGIES:
            for results in per_rank:  # every rank ends each layer with the same hidden states
                assert_same_steps(expected, results[(path, strategy)])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_four_ranks_equal_one_for_both_strategies(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        (str(checkpoints["mixtral"]), ExpertPlacement.contiguous(4, 4)),
        (str(checkpoints["qwen2moe"]), ExpertPlacement(6, 4, ((0, 5), (1, 4), (2,), (3,)))),  # uneven
    ]
    per_rank = _run_ranks(cases, tmp_path)
    for path, _ in cases:
        expected = reference_steps(Path(path))
        for strategy in STRATEGIES:
            assert_same_steps(expected, per_rank[0][(path, strategy)])
