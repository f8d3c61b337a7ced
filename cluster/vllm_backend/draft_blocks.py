"""Which KV cache blocks hold the draft model's KV, for our worker's catch-up under prefix caching (runner.py).

A block is in `DraftBlocks.written` when the draft KV of every position it holds is written: a request's blocks
wholly below its first position without draft KV. A block leaves it when the target writes into it (a block
freed and given to another request holds what the target writes now, and the drafter may not follow). A request
whose first step starts from cached blocks catches up from the first of them not written.
"""

from __future__ import annotations

from collections.abc import Container


class DraftBlocks:
    def __init__(self) -> None:
        self.written: set[int] = set()
        self._num_written: dict[str, int] = {}  # per request: how many of its first blocks were added

    def first_missing(self, request_id: str, block_ids: list[int], block_size: int, start: int) -> int | None:
        """For a request not seen before, whose positions below `start` are computed (a prefix-cache hit): the
        first position whose draft KV may be missing, or None (nothing, or a request seen before)."""
        if request_id in self._num_written:
            return None
        num_cached = start // block_size
        written = next((b for b in range(num_cached) if block_ids[b] not in self.written), num_cached)
        self._num_written[request_id] = written
        if written < num_cached or start % block_size:  # (or its computed positions end inside a block)
            return written * block_size
        return None

    def after_step(
        self, request_id: str, block_ids: list[int], block_size: int, start: int, end: int, valid_to: int
    ) -> None:
        """The target wrote positions [start, end) of the request in this step; its draft KV is written below
        `valid_to` (its lag, else `start`)."""
        self.written.difference_update(block_ids[start // block_size : -(-end // block_size)])
        num_written = valid_to // block_size
        done = self._num_written.get(request_id, 0)
        if num_written > done:
            self.written.update(block_ids[done:num_written])
            self._num_written[request_id] = num_written

    def forget(self, live: Container[str]) -> None:
        """Drops the requests not in `live` (finished or preempted)."""
        for request_id in [r for r in self._num_written if r not in live]:
            del self._num_written[request_id]
