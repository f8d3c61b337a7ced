"""The draft model's pass over some rows of the batch alone: vLLM's proposer, handed the inputs of the requests
that draft (K_r > 0) instead of the whole batch's, and its drafts put back at their rows (the other rows get
zeros, which the scheduler cuts: their K is 0).

Why (`CatchUpWorker`, runner.py): vLLM's draft model drafts for every request of a step that drafts, and its
first pass feeds it every token of the step, other requests' prompt chunks included. Served on the regime
pair at batch 17-32, a step where one request drafted (a test at K = 1) spent 10.9 ms in the drafter, against
3.4 ms for the same draft at batch 1, of a 94 ms step (82 ms plain): the 31 requests at K = 0 cost two thirds
of the test. The rows left out lag (their draft KV misses this step's positions) and are caught up when they
draft, as after a step without the drafter.

Only inputs laid out per request or per token are cut (`CommonAttentionMetadata`'s fields by kind below); a
step with metadata of another kind (multimodal, cross-attention, M-RoPE positions) runs vLLM's pass over the
whole batch, which drafts the same (its extra rows are cut) at the whole batch's cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

# CommonAttentionMetadata's fields, by how a subset of its rows is taken (any other field must be unset).
_PER_ROW = frozenset(
    {
        "seq_lens",
        "seq_lens_cpu_upper_bound",
        "block_table_tensor",
        "is_prefilling",
        "dcp_local_seq_lens",
        "dcp_local_seq_lens_cpu_upper_bound",
        "rswa_prefix_lens",
        "replayssm_decode_base_cpu",
        "req_idx",
    }
)
_PER_TOKEN = frozenset({"slot_mapping", "positions"})
_REBUILT = frozenset(
    {
        "query_start_loc",
        "query_start_loc_cpu",
        "num_reqs",
        "num_actual_tokens",
        "max_query_len",
        "max_seq_len",
    }
)
_KEPT = frozenset({"causal"})  # a bool (a tensor of them is not cut here)
_DROPPED = frozenset({"_num_computed_tokens_cache", "_token_to_req_indices_cache"})  # caches, rebuilt on use


@contextmanager
def drafting_rows_alone(drafter: Any, rows: list[int]) -> Iterator[None]:
    """While open, the drafter's `propose` drafts for these batch rows alone (sorted, not empty)."""
    propose: Callable[..., torch.Tensor] = drafter.propose

    def propose_rows(**kwargs: Any) -> torch.Tensor:
        cad: CommonAttentionMetadata = kwargs["common_attn_metadata"]
        cut = _cut(kwargs, rows)
        if cut is None:
            return propose(**kwargs)  # metadata this cannot cut: the whole batch
        drafts = propose(**cut)  # [len(rows), num_spec_tokens]
        full = drafts.new_zeros((cad.batch_size(), drafts.shape[1]))  # the shape vLLM's pass returns
        full[torch.tensor(rows, device=drafts.device)] = drafts
        return full

    drafter.propose = propose_rows  # an instance attribute over the class's method
    try:
        yield
    finally:
        del drafter.propose


def _cut(kwargs: dict[str, Any], rows: list[int]) -> dict[str, Any] | None:
    """`propose`'s arguments for these rows alone; None where some input cannot be cut."""
    cad: CommonAttentionMetadata = kwargs["common_attn_metadata"]
    positions: torch.Tensor = kwargs["target_positions"]
    if kwargs.get("mm_embed_inputs") is not None or positions.dim() != 1 or not isinstance(cad.causal, bool):
        return None
    starts_cpu = cad.query_start_loc_cpu
    row_ids = torch.tensor(rows, dtype=torch.long)
    begin = starts_cpu[row_ids]
    lengths = starts_cpu[row_ids + 1] - begin
    new_starts_cpu = torch.zeros(len(rows) + 1, dtype=starts_cpu.dtype)
    torch.cumsum(lengths, dim=0, out=new_starts_cpu[1:])
    # Each kept row's tokens, in order: [begin_r, end_r) for r in rows.
    offsets = (begin - new_starts_cpu[:-1]).to(torch.long).repeat_interleave(lengths.to(torch.long))
    tokens_cpu = torch.arange(int(new_starts_cpu[-1]), dtype=torch.long) + offsets
    device = kwargs["target_token_ids"].device
    row_index, token_index = row_ids.to(device), tokens_cpu.to(device)
    new_starts = new_starts_cpu.to(device)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cad):
        value = getattr(cad, field.name)
        if field.name in _PER_ROW or field.name in _PER_TOKEN:
            index = row_index if field.name in _PER_ROW else token_index
            if isinstance(value, torch.Tensor):
                values[field.name] = value[index.to(value.device)]
            elif value is not None:  # numpy, on the host
                values[field.name] = value[(row_ids if field.name in _PER_ROW else tokens_cpu).numpy()]
            else:
                values[field.name] = None
        elif field.name in _DROPPED:
            values[field.name] = None
        elif field.name not in _REBUILT and field.name not in _KEPT and value is not None:
            return None  # cross-attention, multimodal ranges, padded logits indices: not cut here
    upper = values.get("seq_lens_cpu_upper_bound")
    cut_cad = dataclasses.replace(
        cad,
        **values,
        query_start_loc=new_starts,
        query_start_loc_cpu=new_starts_cpu,
        num_reqs=len(rows),
        num_actual_tokens=int(new_starts_cpu[-1]),
        max_query_len=int(lengths.max()),
        max_seq_len=int(upper.max()) if isinstance(upper, torch.Tensor) else cad.max_seq_len,
    )
    cut = dict(kwargs)
    cut["common_attn_metadata"] = cut_cad
    cut["target_token_ids"] = kwargs["target_token_ids"][token_index]
    cut["target_positions"] = positions[token_index]
    cut["target_hidden_states"] = kwargs["target_hidden_states"][token_index]
    cut["next_token_ids"] = kwargs["next_token_ids"][row_index]
    sample = kwargs.get("token_indices_to_sample")
    if sample is not None:  # [batch]: each row's last valid token, an index into the step's tokens
        old_starts = starts_cpu.to(device)[row_index]
        cut["token_indices_to_sample"] = (sample[row_index] - old_starts + new_starts[:-1]).to(sample.dtype)
    rejected = kwargs.get("num_rejected_tokens_gpu")
    if rejected is not None:
        cut["num_rejected_tokens_gpu"] = rejected[row_index]
    return cut
