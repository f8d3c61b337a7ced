"""KV cache for many sequences of different lengths, with a fixed capacity chosen at start.

Each sequence owns one slot: `max_seq_len` positions of keys and values in every layer. A forward appends a
ragged block of new tokens per sequence; `rollback` forgets a sequence's last n positions (the stale keys
beyond its length are masked out, never read); `free` returns the slot. Nothing is allocated after start.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from pathlib import Path

import torch


class CacheCapacityError(RuntimeError):
    """A request does not fit: no free slot, or its sequence would exceed max_seq_len.

    A server-side condition, not a client error: requests are validated against the context length before
    they reach a cache, and the engine never admits more sequences than there are slots. Seeing it means the
    cache is held by sequences nobody runs (a leak), so it maps to 503, never to 400."""


@dataclass(frozen=True)
class CacheConfig:
    max_seqs: int = 64  # sequences held at once (slots)
    max_seq_len: int = 2048  # tokens per sequence (prompt + output + speculative lookahead)

    def __post_init__(self) -> None:
        if self.max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {self.max_seqs}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")


def check_memory(num_bytes: int, device: torch.device, what: str) -> None:
    """Raise a ValueError naming `what` if `num_bytes` exceed the memory available on `device` (checked on
    CUDA and on Linux hosts; elsewhere the allocation itself fails). Call before allocating."""
    available = _available_bytes(device)
    if available is not None and num_bytes > available:
        raise ValueError(
            f"{what} needs {num_bytes / 2**30:.1f} GiB but {device} has {available / 2**30:.1f} GiB "
            "available: lower max_seqs or max_seq_len"
        )


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.exists():  # MemAvailable counts reclaimable page cache, MemFree not
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


class KVCache:
    """Keys and values for all layers: [num_layers, max_seqs, num_kv_heads, max_seq_len, head_dim]."""

    def __init__(
        self,
        config: CacheConfig,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        shape = (num_layers, config.max_seqs, num_kv_heads, config.max_seq_len, head_dim)
        num_bytes = 2 * math.prod(shape) * dtype.itemsize  # keys and values
        check_memory(
            num_bytes,
            torch.device(device),
            f"the KV cache ({config.max_seqs} sequences x {config.max_seq_len} tokens x {num_layers} layers)",
        )
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._slot_of: dict[int, int] = {}  # seq_id -> slot
        self._length: dict[int, int] = {}  # seq_id -> tokens cached
        # A min-heap: the lowest free slot goes first, which keeps a batch's slots dense (see batch.py).
        self._free_slots = list(range(config.max_seqs))

    # -- sequences -------------------------------------------------------------------------------------------

    def add(self, seq_id: int) -> None:
        if seq_id in self._slot_of:
            raise ValueError(f"sequence {seq_id} is already in the cache")
        if not self._free_slots:
            raise CacheCapacityError(
                f"KV cache is full: all {self.config.max_seqs} sequence slots are in use"
            )
        self._slot_of[seq_id] = heapq.heappop(self._free_slots)
        self._length[seq_id] = 0

    def free(self, seq_id: int) -> None:
        """Release a sequence's slot. Freeing an unknown sequence is a no-op (abort paths call it twice)."""
        slot = self._slot_of.pop(seq_id, None)
        if slot is not None:
            del self._length[seq_id]
            heapq.heappush(self._free_slots, slot)

    def rollback(self, seq_id: int, num_tokens: int) -> None:
        length = self.length(seq_id)
        if not 0 <= num_tokens <= length:
            raise ValueError(f"cannot roll back {num_tokens} of {length} tokens of sequence {seq_id}")
        self._length[seq_id] = length - num_tokens

    def truncate(self, seq_id: int, length: int) -> None:
        self.rollback(seq_id, self.length(seq_id) - length)

    def check_fits(self, seq_ids: list[int], num_new: list[int]) -> None:
        """Raise CacheCapacityError before a forward that would overflow any sequence."""
        for seq_id, n in zip(seq_ids, num_new, strict=True):
            if self.length(seq_id) + n > self.config.max_seq_len:
                raise CacheCapacityError(
                    f"sequence {seq_id} would hold {self.length(seq_id) + n} tokens; "
                    f"max_seq_len is {self.config.max_seq_len}"
                )

    def advance(self, seq_ids: list[int], num_new: list[int]) -> None:
        for seq_id, n in zip(seq_ids, num_new, strict=True):
            self._length[seq_id] += n

    # -- lookups ---------------------------------------------------------------------------------------------

    def length(self, seq_id: int) -> int:
        if seq_id not in self._length:
            raise KeyError(f"sequence {seq_id} is not in the KV cache")
        return self._length[seq_id]

    def slot(self, seq_id: int) -> int:
        if seq_id not in self._slot_of:
            raise KeyError(f"sequence {seq_id} is not in the KV cache")
        return self._slot_of[seq_id]

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._slot_of

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_used_slots(self) -> int:
        return len(self._slot_of)

    @property
    def seq_ids(self) -> list[int]:
        return list(self._slot_of)
