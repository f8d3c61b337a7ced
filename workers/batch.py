"""The layout of one ragged forward: which cache slot and position every new token goes to.

Built once per forward on the host (CPU), then moved to the model's device, and shared by every layer.
Attention runs on a padded view [R, max_new] of the flat [T] tokens, one row per cache slot it reads;
`row_index` / `column_index` map between the two. When the batch's slots are dense (the usual case under
load: slots are handed out lowest first), the rows are the slot range [key_start, key_start + R) and
attention reads the cache in place; otherwise the rows are the batch's sequences and their keys are
gathered (a copy of every key and value the batch reads, in every layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# In-place reads while the slot range holds at most this many rows per sequence of the batch: an idle row
# costs about as much attention work as a real one, a gathered key and value cost about three times more
# (measured: `python -m bench.attention`). 0 always gathers.
MAX_ROWS_PER_SEQUENCE = 2.0


@dataclass(frozen=True)
class BatchLayout:
    slots: torch.Tensor  # [B] cache slot of each sequence
    start_lens: torch.Tensor  # [B] tokens already cached for each sequence
    num_new: list[int]  # [B] new tokens per sequence
    token_slots: torch.Tensor  # [T] cache slot of each new token
    positions: torch.Tensor  # [T] absolute position of each new token
    batch_index: torch.Tensor  # [T] which sequence each new token belongs to
    column_index: torch.Tensor  # [T] index of each new token within its sequence's new block
    row_index: torch.Tensor  # [T] attention row of each new token
    num_rows: int  # R: slots in the range (in-place reads) or B (gathered reads)
    key_start: int | None  # first slot of the in-place range; None: keys are gathered from `slots`
    max_new: int
    max_ctx: int  # longest sequence after the append: keys are read for positions [0, max_ctx)
    mask: torch.Tensor  # [R, 1, max_new, max_ctx] True where a query may attend to a key

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
        slot_ids = torch.tensor(slots, device=cpu)
        batch_index = torch.repeat_interleave(torch.arange(len(slots), device=cpu), counts)
        offsets = torch.cumsum(counts, 0) - counts  # flat index of each sequence's first new token
        column_index = torch.arange(int(counts.sum()), device=cpu) - offsets[batch_index]
        positions = starts[batch_index] + column_index
        max_new = max(num_new)
        max_ctx = max(s + n for s, n in zip(start_lens, num_new, strict=True))
        mask = _mask(starts, counts, max_new, max_ctx, sliding_window)  # [B, max_new, max_ctx]

        key_start: int | None = min(slots)
        num_rows = max(slots) - min(slots) + 1
        if num_rows <= MAX_ROWS_PER_SEQUENCE * len(slots):  # dense: idle rows cost less than a gather
            rows = slot_ids - min(slots)
            padded = torch.zeros(num_rows, max_new, max_ctx, dtype=torch.bool, device=cpu)
            padded[:, :, 0] = True  # idle rows attend to one key (no all-masked row: no NaN); never read
            padded[rows] = mask
            mask = padded
        else:
            key_start, num_rows, rows = None, len(slots), torch.arange(len(slots), device=cpu)
        return cls(
            slots=slot_ids.to(device),
            start_lens=starts.to(device),
            num_new=list(num_new),
            token_slots=slot_ids[batch_index].to(device),
            positions=positions.to(device),
            batch_index=batch_index.to(device),
            column_index=column_index.to(device),
            row_index=rows[batch_index].to(device),
            num_rows=num_rows,
            key_start=key_start,
            max_new=max_new,
            max_ctx=max_ctx,
            mask=mask[:, None].to(device),
        )


def _mask(
    starts: torch.Tensor, counts: torch.Tensor, max_new: int, max_ctx: int, sliding_window: int | None
) -> torch.Tensor:
    """[B, max_new, max_ctx]: key position p is visible to query j of sequence b (causal, own length)."""
    query_pos = starts[:, None] + torch.arange(max_new, device=starts.device)[None, :]  # [B, max_new]
    key_pos = torch.arange(max_ctx, device=starts.device)[None, None, :]  # [1, 1, max_ctx]
    end = (starts + counts)[:, None, None]
    mask = (key_pos <= query_pos[:, :, None]) & (key_pos < end)
    if sliding_window is not None:
        mask &= key_pos > query_pos[:, :, None] - sliding_window
    return mask
