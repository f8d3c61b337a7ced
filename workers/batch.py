"""The layout of one ragged forward: which cache slot and position every new token goes to.

Built once per forward on the host (CPU), then moved to the model's device, and shared by every layer. Attention runs on a padded view
[B, max_new] of the flat [T] tokens; `batch_index` / `column_index` map between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchLayout:
    slots: torch.Tensor  # [B] cache slot of each sequence
    start_lens: torch.Tensor  # [B] tokens already cached for each sequence
    num_new: list[int]  # [B] new tokens per sequence
    token_slots: torch.Tensor  # [T] cache slot of each new token
    positions: torch.Tensor  # [T] absolute position of each new token
    batch_index: torch.Tensor  # [T] which sequence each new token belongs to
    column_index: torch.Tensor  # [T] index of each new token within its sequence's new block
    max_new: int
    max_ctx: int  # longest sequence after the append: keys are read for positions [0, max_ctx)
    mask: torch.Tensor  # [B, 1, max_new, max_ctx] True where a query may attend to a key

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def last_token_index(self) -> torch.Tensor:
        """[B] flat index of each sequence's last new token."""
        ends = torch.tensor(self.num_new, device=self.positions.device).cumsum(0)
        return ends - 1

    @classmethod
    def build(
        cls,
        slots: list[int],
        start_lens: list[int],
        num_new: list[int],
        sliding_window: int | None = None,
        device: torch.device | str = "cpu",
    ) -> BatchLayout:
        if not slots:
            raise ValueError("a forward needs at least one sequence")
        if any(n < 1 for n in num_new):
            raise ValueError(f"every sequence needs at least one new token, got {num_new}")
        cpu = torch.device("cpu")  # small index tensors: built on the host, moved once
        counts = torch.tensor(num_new, device=cpu)
        starts = torch.tensor(start_lens, device=cpu)
        batch_index = torch.repeat_interleave(torch.arange(len(slots), device=cpu), counts)
        offsets = torch.cumsum(counts, 0) - counts  # flat index of each sequence's first new token
        column_index = torch.arange(int(counts.sum()), device=cpu) - offsets[batch_index]
        positions = starts[batch_index] + column_index
        max_new = max(num_new)
        max_ctx = max(s + n for s, n in zip(start_lens, num_new, strict=True))
        # mask[b, 0, j, p]: key position p is visible to query j of sequence b.
        query_pos = starts[:, None] + torch.arange(max_new, device=cpu)[None, :]  # [B, max_new]
        key_pos = torch.arange(max_ctx, device=cpu)[None, None, :]  # [1, 1, max_ctx]
        end = (starts + counts)[:, None, None]
        mask = (key_pos <= query_pos[:, :, None]) & (key_pos < end)
        if sliding_window is not None:
            mask &= key_pos > query_pos[:, :, None] - sliding_window
        slot_ids = torch.tensor(slots, device=cpu)
        return cls(
            slots=slot_ids.to(device),
            start_lens=starts.to(device),
            num_new=list(num_new),
            token_slots=slot_ids[batch_index].to(device),
            positions=positions.to(device),
            batch_index=batch_index.to(device),
            column_index=column_index.to(device),
            max_new=max_new,
            max_ctx=max_ctx,
            mask=mask[:, None].to(device),
        )
