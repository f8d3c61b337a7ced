"""A model with its KV cache: the forward API every engine (drafter, target, expert-parallel rank) uses.

Sequences are identified by integer ids chosen by the caller. `forward` appends each sequence's new tokens
to the cache and returns logits for them; `rollback` forgets rejected positions; `free` releases the slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import torch

from workers.batch import BatchLayout
from workers.checkpoint import load_model
from workers.config import ModelConfig
from workers.kv_cache import CacheConfig, KVCache
from workers.model import ForwardOutput, Transformer


class Runner(Protocol):
    """What engines need of a model with a KV cache: `ModelRunner`, or an expert-parallel group."""

    @property
    def config(self) -> ModelConfig: ...
    @property
    def cache(self) -> KVCache: ...
    def add_sequence(self, seq_id: int) -> None: ...
    def free(self, seq_id: int) -> None: ...
    def rollback(self, seq_id: int, num_tokens: int) -> None: ...
    def seq_len(self, seq_id: int) -> int: ...
    def forward(
        self,
        seq_ids: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        logits_for: Literal["all", "last"] = "all",
    ) -> ForwardOutput: ...


class ModelRunner:
    def __init__(self, model: Transformer, cache_config: CacheConfig) -> None:
        config = model.config
        if cache_config.max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len={cache_config.max_seq_len} exceeds the model's "
                f"max_position_embeddings={config.max_position_embeddings}"
            )
        self.model = model
        self.config = config
        weight = next(model.parameters())
        self.dtype, self.device = weight.dtype, weight.device
        self.cache = KVCache(
            cache_config, config.num_layers, config.num_kv_heads, config.head_dim, self.dtype, self.device
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        cache_config: CacheConfig,
        dtype: torch.dtype | None = None,
        expert_ids: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> ModelRunner:
        """The model on `device` ("cpu", "cuda", "cuda:1"); the weights are read on the host, then moved."""
        model = load_model(path, dtype=dtype, max_positions=cache_config.max_seq_len, expert_ids=expert_ids)
        return cls(model.to(device), cache_config)

    # -- sequences -------------------------------------------------------------------------------------------

    def add_sequence(self, seq_id: int) -> None:
        self.cache.add(seq_id)

    def free(self, seq_id: int) -> None:
        self.cache.free(seq_id)

    def rollback(self, seq_id: int, num_tokens: int) -> None:
        self.cache.rollback(seq_id, num_tokens)

    def seq_len(self, seq_id: int) -> int:
        return self.cache.length(seq_id)

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(
        self,
        seq_ids: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        logits_for: Literal["all", "last"] = "all",
    ) -> ForwardOutput:
        """Append token_ids[i] to sequence seq_ids[i] and return logits.

        logits_for="all": one row per new token, in order ([sum(len(t)), vocab]);
        "last": one row per sequence, for its last new token ([len(seq_ids), vocab]).
        """
        seq_ids = list(seq_ids)
        num_new = [len(t) for t in token_ids]
        if len(seq_ids) != len(num_new):
            raise ValueError(f"{len(seq_ids)} sequences but {len(num_new)} token lists")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence appears twice in one forward: {seq_ids}")
        self.cache.check_fits(seq_ids, num_new)
        layout = BatchLayout.build(
            slots=[self.cache.slot(s) for s in seq_ids],
            start_lens=[self.cache.length(s) for s in seq_ids],
            num_new=num_new,
            sliding_window=self.config.sliding_window,
            device=self.device,
        )
        flat = [t for tokens in token_ids for t in tokens]
        if any(not 0 <= t < self.config.vocab_size for t in flat):
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        input_ids = torch.tensor(flat, dtype=torch.long, device=self.device)
        logits_index = layout.last_token_index if logits_for == "last" else None
        out = self.model(input_ids, layout, self.cache, logits_index)
        self.cache.advance(seq_ids, num_new)
        return out
