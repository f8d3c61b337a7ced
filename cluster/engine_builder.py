"""One engine builder: every value the engine and its model caches derive from an `AppConfig`, computed here
once, and `build_engine`, which the Serve app, the tests' local router and the benchmarks all use.

The context length users see is `model.max_seq_len`, and the caches hold exactly that many positions: the
engine never drafts past it (K_r <= max_seq_len - tokens so far, and K_r < tokens the request may still
emit), so no padding is needed, and none can leak into /v1/models or past the model's positions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.config import AppConfig, resolve_model_path
from policy.stats import KChooser
from workers.backends import DraftBackend, TargetBackend
from workers.drafter import Drafter
from workers.engine import EngineConfig, SpecEngine
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner, Runner
from workers.target import Target
from workers.tokenizer import Tokenizer

DRAFTER_RETRY_S = 2.0  # after a drafter failure, the engine runs at K = 0 this long before asking again


def cache_config(config: AppConfig) -> CacheConfig:
    """The KV cache of the target and of the drafter: one slot per batch row, the served context length."""
    return CacheConfig(config.model.max_seqs, config.model.max_seq_len)


def engine_config(config: AppConfig) -> EngineConfig:
    return EngineConfig(
        max_batch_size=config.model.max_seqs,
        max_spec_tokens=config.engine.max_spec_tokens,
        # The router admits up to max_outstanding requests; the engine queues all but the running batch.
        max_waiting=config.max_outstanding,
        drafter_retry_s=DRAFTER_RETRY_S,
        target_recovery_s=config.engine.target_recovery_s,
    )


def build_engine(
    config: AppConfig,
    target: TargetBackend,
    drafter: DraftBackend | None,
    chooser: KChooser,
    tokenizer: Tokenizer | None,
) -> SpecEngine:
    """The engine over any target and drafter: local ones (`local_backends`) or proxies to host actors."""
    return SpecEngine(target, drafter, chooser, engine_config(config), tokenizer)


def torch_dtype(config: AppConfig) -> torch.dtype | None:
    """The models' dtype; None = the checkpoint's."""
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(config.model.dtype)


def load_runner(path: str | Path, config: AppConfig, device: torch.device | str = "cpu") -> ModelRunner:
    """One model with its KV cache, sized by `cache_config`."""
    return ModelRunner.from_checkpoint(
        resolve_model_path(str(path)), cache_config(config), torch_dtype(config), device=device
    )


def target_runner(config: AppConfig, device: torch.device | str = "cpu") -> Runner:
    """The target's model: in this process, or an expert-parallel group of rank actors (needs Ray)."""
    ep = config.expert_parallel
    if ep.num_ranks == 1:
        return load_runner(config.model.target, config, device)
    from cluster.ep_group import EPGroup, EPGroupConfig
    from workers.expert_parallel import check_strategy

    res = config.resources
    return EPGroup(
        EPGroupConfig(
            checkpoint=str(resolve_model_path(config.model.target)),
            num_ranks=ep.num_ranks,
            cache=cache_config(config),
            strategy=check_strategy(ep.strategy),
            dtype=torch_dtype(config),
            num_cpus_per_rank=res.target_num_cpus,
            use_gpus=res.target_num_gpus > 0 or None,
            num_threads_per_rank=res.torch_threads,
        )
    )


def local_backends(config: AppConfig, device: torch.device | str = "cpu") -> tuple[Target, Drafter | None]:
    """The target and the drafter in this process (tests, offline benchmarks), as the host actors build them."""
    drafter = draft_engine(config, device) if config.model.draft else None
    return Target(target_runner(config, device)), drafter


def draft_engine(config: AppConfig, device: torch.device | str = "cpu") -> Drafter:
    if config.model.draft is None:
        raise ValueError("model.draft is not set: this app serves without speculation")
    return Drafter(load_runner(config.model.draft, config, device), config.engine.draft_proposals)
