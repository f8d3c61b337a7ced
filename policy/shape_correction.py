"""The cost model's shape correction, fitted against time (`policy.cost_model`'s module docstring has why).

A batch-size bucket's iterations, oldest first, are cut into time blocks of `block_size`; log(measured /
predicted) is fitted as the block's level plus the K's shape. Only blocks that measured two K at once inform
the shape, so the machine's drift between K measured minutes apart reads as level, not shape.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


def time_blocked_factors(
    log_ratio: Array, per_seq: NDArray[np.int64], block_size: int, pseudo_count: float
) -> tuple[Array, Array]:
    """One bucket's (drafts per sequence measured, factors), from its rows oldest first: log ratio =
    level of the row's time block + shape of its K, by least squares over the blocks' per-K medians
    with the shape pulled toward 0 (the parametric form) by `pseudo_count` iterations; the
    factor of K is exp(the latest block's level + K's shape)."""
    block = (
        np.arange(len(log_ratio))[::-1] // block_size
    )  # 0: the latest (a full block when there are enough)
    js, j_index = np.unique(per_seq, return_inverse=True)
    num_blocks = int(block[0]) + 1
    cell = block * len(js) + j_index
    order = np.lexsort((log_ratio, cell))  # by cell, then by ratio: each cell's median from its middle
    cells, starts, counts = np.unique(cell[order], return_index=True, return_counts=True)
    ranked = log_ratio[order]
    medians = 0.5 * (ranked[starts + (counts - 1) // 2] + ranked[starts + counts // 2])
    # Least squares over the (block, K) cells, each weighted by its rows: sum w (median - level - shape)^2
    # + pseudo * |shape|^2. Each block's level is its cells' weighted mean of median - shape, so the shape
    # solves (sum_b D_b + pseudo I) shape = sum_b D_b medians_b, D_b = diag(w_b) - w_b w_b' / W_b: a block
    # that measured one K alone (D_b = 0) fixes its level and says nothing of the shape.
    weights = np.zeros((num_blocks, len(js)))
    table = np.zeros((num_blocks, len(js)))
    weights.flat[cells], table.flat[cells] = counts, medians
    share = weights / weights.sum(axis=1, keepdims=True)
    normal = np.diag(weights.sum(axis=0)) - share.T @ weights
    normal += pseudo_count * np.eye(len(js))
    weighted = weights * table
    shape = np.linalg.solve(normal, weighted.sum(axis=0) - share.T @ weighted.sum(axis=1))
    level = float(share[0] @ (table[0] - shape))  # the latest block's
    return js.astype(np.float64), np.exp(level + shape)
