"""Device placement: every tensor the runtime creates follows the model's device.

No GPU here, so the check runs on the CPU and watches torch's factory functions: a tensor that our code
creates in a forward, a proposal or a verification without naming its device would be a CPU tensor next to
a model on a GPU. With a GPU, the `gpu`-marked test runs the same model on CUDA against the CPU result.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.workers.checkpoints import make_checkpoint
from tests.workers.device_watch import RequireDevice
from workers.drafter import Drafter, DraftRequest
from workers.expert_parallel import EPWorker
from workers.kv_cache import CacheConfig
from workers.placement import ExpertPlacement
from workers.runner import ModelRunner
from workers.sampling import SamplingParams
from workers.target import Target, VerifyRequest

CACHE = CacheConfig(max_seqs=4, max_seq_len=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=3)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("device")
    return {
        "target": make_checkpoint(root / "target", "Qwen2MoeForCausalLM"),  # routed + shared experts
        "draft": make_checkpoint(root / "draft", "LlamaForCausalLM", num_hidden_layers=1),
    }


def _speculate(target: Target, drafter: Drafter) -> list[list[int]]:
    """Prefill two sequences, draft three tokens each (one greedy, one sampled), verify them."""
    prompts, params = [[1, 5, 9, 13], [2, 4, 6]], [GREEDY, SAMPLED]
    first = target.prefill([0, 1], prompts, params).token_ids
    histories = [p + [t] for p, t in zip(prompts, first, strict=True)]
    drafted = drafter.propose([DraftRequest(i, 0, histories[i], 3, params[i]) for i in range(2)])
    verified = target.verify(
        [
            VerifyRequest(i, histories[i][-1], p.draft_ids, p.draft_probs, params[i])
            for i, p in enumerate(drafted.proposals)
        ]
    )
    assert all(p.draft_probs is None or p.draft_probs.device.type == "cpu" for p in drafted.proposals)
    return [first, *verified.committed_ids]


def _load(paths: dict[str, Path], device: str) -> tuple[Target, Drafter]:
    target = ModelRunner.from_checkpoint(paths["target"], CACHE, torch.float32, device=device)
    draft = ModelRunner.from_checkpoint(paths["draft"], CACHE, torch.float32, device=device)
    return Target(target), Drafter(draft)


def test_no_tensor_is_created_off_the_model_device(paths: dict[str, Path]) -> None:
    target, drafter = _load(paths, "cpu")
    with RequireDevice() as watch:
        committed = _speculate(target, drafter)
    assert all(len(c) >= 1 for c in committed)
    assert not watch.missing, watch.missing


def test_expert_parallel_layers_create_nothing_off_the_device(paths: dict[str, Path]) -> None:
    worker = EPWorker(paths["target"], CACHE, ExpertPlacement.contiguous(6, 1), 0, dtype=torch.float32)
    worker.add_sequence(0)
    with RequireDevice() as watch:
        out = worker.forward([0], [[1, 2, 3]])
    assert out.logits.shape[0] == 3
    assert not watch.missing, watch.missing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_tokens(paths: dict[str, Path]) -> None:
    on_cpu = _speculate(*_load(paths, "cpu"))
    on_gpu = _speculate(*_load(paths, "cuda"))
    assert on_gpu[0] == on_cpu[0] and on_gpu[1] == on_cpu[1]  # the greedy sequence: the same tokens
