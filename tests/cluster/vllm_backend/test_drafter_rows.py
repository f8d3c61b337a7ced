"""`drafter_rows`: the draft model's pass over some rows of the batch. Its inputs, cut to those rows, are the
rows' own (tokens, positions, metadata, the index of each row's token to sample from), and its drafts go back
to their rows. No engine: a stand-in proposer records what it is handed."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from tests.cluster.vllm_backend.conftest import needs_vllm

pytestmark = needs_vllm


def _first_pass_inputs() -> dict[str, Any]:
    """Three rows of a verification step: 3, 1 and 2 tokens (tokens 0-5), one of row 0's rejected."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    starts = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    cad = CommonAttentionMetadata(
        query_start_loc=starts.clone(),
        query_start_loc_cpu=starts,
        seq_lens=torch.tensor([13, 21, 32], dtype=torch.int32),
        num_reqs=3,
        num_actual_tokens=6,
        max_query_len=3,
        max_seq_len=32,
        block_table_tensor=torch.tensor([[1, 2], [3, 4], [5, 6]]),
        slot_mapping=torch.arange(100, 106),
        seq_lens_cpu_upper_bound=torch.tensor([13, 21, 32], dtype=torch.int32),
    )
    return {
        "num_speculative_tokens": 2,
        "target_token_ids": torch.arange(10, 16),
        "target_positions": torch.tensor([10, 11, 12, 20, 30, 31]),
        "target_hidden_states": torch.arange(6.0)[:, None].repeat(1, 4),
        "next_token_ids": torch.tensor([7, 8, 9]),
        "token_indices_to_sample": torch.tensor([1, 3, 5], dtype=torch.int32),  # each row's last valid token
        "common_attn_metadata": cad,
        "sampling_metadata": None,
        "mm_embed_inputs": None,
        "num_rejected_tokens_gpu": torch.tensor([1, 0, 0], dtype=torch.int32),
        "slot_mappings": None,
    }


class _Proposer:
    def __init__(self) -> None:
        self.handed: list[dict[str, Any]] = []

    def propose(self, **kwargs: Any) -> torch.Tensor:
        """Drafts each row's next token K times: [rows, K]."""
        self.handed.append(kwargs)
        return kwargs["next_token_ids"][:, None].repeat(1, kwargs["num_speculative_tokens"])


def test_the_pass_gets_the_kept_rows_inputs_and_its_drafts_go_back_to_their_rows() -> None:
    from cluster.vllm_backend.drafter_rows import drafting_rows_alone

    proposer = _Proposer()
    with drafting_rows_alone(proposer, [0, 2]):
        drafts = proposer.propose(**_first_pass_inputs())
    assert "propose" not in vars(proposer)  # the class's method again
    (handed,) = proposer.handed
    cad = handed["common_attn_metadata"]
    # Rows 0 and 2: tokens 0-2 and 4-5.
    assert handed["target_token_ids"].tolist() == [10, 11, 12, 14, 15]
    assert handed["target_positions"].tolist() == [10, 11, 12, 30, 31]
    assert handed["target_hidden_states"][:, 0].tolist() == [0.0, 1.0, 2.0, 4.0, 5.0]
    assert handed["next_token_ids"].tolist() == [7, 9]
    assert handed["num_rejected_tokens_gpu"].tolist() == [1, 0]
    # Each row's token to sample from, as an index into the kept tokens: row 0's second, row 2's second.
    assert handed["token_indices_to_sample"].tolist() == [1, 4]
    assert cad.query_start_loc_cpu.tolist() == cad.query_start_loc.tolist() == [0, 3, 5]
    assert (cad.num_reqs, cad.num_actual_tokens, cad.max_query_len, cad.max_seq_len) == (2, 5, 3, 32)
    assert cad.seq_lens.tolist() == [13, 32] and cad.seq_lens_cpu_upper_bound.tolist() == [13, 32]
    assert cad.block_table_tensor.tolist() == [[1, 2], [5, 6]]
    assert cad.slot_mapping.tolist() == [100, 101, 102, 104, 105]
    # The drafts come back in the whole batch's shape; the row left out gets zeros (its K is 0: cut).
    assert drafts.tolist() == [[7, 7], [0, 0], [9, 9]]


def test_metadata_it_cannot_cut_runs_the_whole_batch() -> None:
    from cluster.vllm_backend.drafter_rows import drafting_rows_alone

    inputs = _first_pass_inputs()
    cad = inputs["common_attn_metadata"]
    for changed in (
        {"common_attn_metadata": dataclasses.replace(cad, encoder_seq_lens=torch.ones(3, dtype=torch.int32))},
        {"target_positions": inputs["target_positions"][None].repeat(3, 1)},  # M-RoPE
    ):
        proposer = _Proposer()
        with drafting_rows_alone(proposer, [1]):
            drafts = proposer.propose(**{**inputs, **changed})
        assert proposer.handed[0]["common_attn_metadata"].num_reqs == 3
        assert drafts.tolist() == [[7, 7], [8, 8], [9, 9]]


@pytest.mark.parametrize("rows", [[0], [1], [2], [0, 1, 2]])
def test_any_rows_cut_consistently(rows: list[int]) -> None:
    from cluster.vllm_backend.drafter_rows import drafting_rows_alone

    proposer = _Proposer()
    inputs = _first_pass_inputs()
    with drafting_rows_alone(proposer, rows):
        proposer.propose(**inputs)
    handed = proposer.handed[0]
    cad = handed["common_attn_metadata"]
    starts = cad.query_start_loc_cpu
    assert cad.num_actual_tokens == int(starts[-1]) == len(handed["target_token_ids"])
    for i, row in enumerate(rows):
        tokens = handed["target_token_ids"][int(starts[i]) : int(starts[i + 1])].tolist()
        old = inputs["common_attn_metadata"].query_start_loc_cpu
        assert tokens == inputs["target_token_ids"][int(old[row]) : int(old[row + 1])].tolist()
        sample = int(handed["token_indices_to_sample"][i]) - int(starts[i])
        assert sample == int(inputs["token_indices_to_sample"][row]) - int(old[row])
