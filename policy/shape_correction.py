"""The cost model's shape correction (`policy.cost_model`): per batch-size bucket, a factor on the parametric
form's time per verification tokens per sequence (at least 1 where the batch drafts at all,
`drafts_per_sequence`), fitted against time.

Why. The parametric form holds the target's time as a function of tokens through N(t), the distinct experts
they touch, and with no measured expert counts (vLLM on CPU) N(t) is the uniform-routing formula. On the
regime pair's served record that shape was off by more than the choices it decides: the fit put a batch-1 step
verifying one draft 5% under its measured time and one verifying four 6% over, and a plain batch-4 step at
20.1 ms against 23.4 measured; the chooser drafted K = 1 through prose at batch 1, where vLLM without
speculation ran 1.11x faster. A routing correlation in N(t) fitted no better (mean relative error 0.073-0.091
against 0.073 independent). So after each refit the model corrects each batch-size bucket's predictions by a
factor per verification tokens per sequence (1 + K): interpolated between measured K and held at the nearest
one beyond them, so an unexplored K rests on the parametric form's ratio to the nearest measured K. (Held at 1
instead, a bucket that had measured only plain steps, 10-20% faster than the prior put them, saw every K as
that much dearer relative to plain: served on the regime pair, auto never drafted at synthetic 1 / 4 / 16,
where static K = 4 ran 1.3-1.5x off.)

The drafter's time is in the factor, and a step where any request drafts takes a drafting factor (session
42). vLLM's draft model feeds its first pass every token of the step, so the drafter of a step that drafts one
token costs far more than a quarter of one that drafts four: served on the regime pair at batch 16, 14.8 ms
against 23.9 ms, where the form's draft steps times a cost per step put K = 1's drafter at 0.56x its measured
time and K = 4's at 1.26x (`CostParams.draft_first_pass_s` now lets the form follow that). Corrected in the
verify and other times alone, that error stayed in every prediction, and a step where 4 of 16 requests drafted
was rounded to K = 0, plain decoding's factor. The model put a batch-16 step at K = 1 at 1.45x a plain one where
it ran 1.61x, and auto drafted K = 1 through prose at 0.55 acceptance (64 of a cell's 186 steps) at a loss.
Replayed over session 41's records, drafting's error relative to plain decoding (`bench.replay_record`'s
`relative_error`) went from 0.047 / 0.029 / 0.054 to 0.040 / 0.023 / 0.048; served side by side
(`bench/results/vllm_policy_s42_regime_drafter_shape_ab_side_by_side.json`), auto over the version before ran
1.039 paired over 12 runs (standard error 0.007; every run above 1), prose 16's drafting steps 64 to 20 in its
first round, synthetic 16's request-steps at K = 4 from 338-398 to 505-622 per cell.

The factors are measured against time. This machine's speed drifts 10-60% from minute to minute, and the
bucket's recent iterations span minutes: a median ratio per K (the correction until session 29) compared K = 0
measured in one minute with K = 4 measured in another. Replayed on the regime pair's record (session 28), the
model put a batch-1 step at K = 4 at 4.6x a plain one at one cell's start, where they ran 2.8x apart in that
cell (2.5-2.9x in every batch-1 cell), and auto drafted in a fifth of synthetic's batch-1 steps while static
K = 3 ran 1.26x off. So the bucket's iterations are cut into time blocks of `CostModelConfig.correction_block`
and the log ratio is fitted as the block's level plus the K's shape, by least squares over the blocks' per-K
medians: only blocks that measured two K at once inform the shape (pulled toward the parametric form by
`CostModelConfig.correction_pseudo_count` iterations), and the level is the latest block's, so that the
predictions follow the machine's speed now. A block that measured two K stays in the correction after it left
the ring (`CostModelConfig.max_archived_blocks`): after a plain cell at batch 1 (about 900 iterations) the
ring holds plain steps alone, and K = 4's shape fell back to the parametric form's. At the cell's start above:
K = 4 at 3.8x a plain step with time blocks, 3.3x with the blocks kept (2.8x measured). Replayed over six
served records, plain steps' predicted time per cell and bucket came closer to the measured one on every
record (`bench.replay_record`'s `level_error`: 0.08-0.28 before, 0.06-0.23 after).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]


def time_blocked_factors(
    log_ratio: Array, per_seq: NDArray[np.int64], block_size: int, pseudo_count: float
) -> tuple[Array, Array, Array]:
    """One bucket's (drafts per sequence measured, factors, rows at each), from its rows oldest first: log ratio =
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
    return js.astype(np.float64), np.exp(level + shape), weights.sum(axis=0)


def drafts_per_sequence(max_steps: Array, total_spec: Array, batch_size: ArrayLike) -> Array:
    """What the shape correction's factors are indexed by: verified drafts per sequence, at least 1 where the
    batch drafts at all (0 for plain decoding alone). A batch where a few requests draft runs the drafter
    all the same (vLLM's draft model over every sequence, its first pass feeding the whole step; our worker
    drafting alone at its fixed costs), so its factor is a drafting one; rounded to 0 it was plain decoding's
    (`correction_keys`)."""
    per_seq = total_spec / np.asarray(batch_size, dtype=np.float64)
    return np.where(max_steps > 0, np.maximum(per_seq, 1.0), 0.0)


def correction_keys(rows: Array) -> NDArray[np.int64]:
    """Each cost-model row's `drafts_per_sequence`, rounded: the K its factor is fitted for."""
    return np.rint(drafts_per_sequence(rows[:, 1], rows[:, 2], rows[:, 0])).astype(np.int64)


class ShapeCorrection:
    """The factors per batch-size bucket, refitted from the cost model's rows (`fit`), and the time blocks kept
    after they left the cost model's rings (`archive`, at most `max_archived_blocks` per bucket)."""

    def __init__(self, block_size: int, pseudo_count: float, max_archived_blocks: int) -> None:
        self.block_size = block_size
        self.pseudo_count = pseudo_count
        self.max_archived_blocks = max_archived_blocks
        # The last fit's rows (each one's bucket, drafts per sequence, log ratio), and by bucket its factors
        # from them: (drafts per sequence measured, factors, rows at each), None where it has no rows. A fit
        # fits the buckets used since the fit before (where a refit delays nothing: the vLLM scheduler's, while
        # the worker runs a step), and any other at its first use: a refit took 1.5 ms of CPU, over a third of
        # it fitting every bucket's, on a served record of the demo pair (vLLM backend) whose cells use one or
        # two.
        self._rows: tuple[NDArray[np.int64], NDArray[np.int64], Array] | None = None
        self._factors: dict[int, tuple[Array, Array, Array] | None] = {}
        self._used: set[int] = set()  # the buckets asked for since the last fit
        self._archived: dict[int, list[Array]] = {}  # by bucket: blocks that measured two K, oldest first

    def factors(self, bucket: int, per_seq: Array) -> Array | None:
        """The factors at these drafts per sequence (interpolated, held at the end ones beyond the measured);
        None where the bucket has none."""
        self._used.add(bucket)
        factors = self._bucket_factors(bucket)
        return None if factors is None else np.interp(per_seq, *factors[:2])

    def num_rows(self, bucket: int, per_seq: int) -> int:
        """Rows of the last fit in this bucket at these drafts per sequence (its shape rests on them)."""
        self._used.add(bucket)
        factors = self._bucket_factors(bucket)
        if factors is None:
            return 0
        found = np.flatnonzero(factors[0] == per_seq)
        return int(factors[2][found[0]]) if len(found) else 0

    def fit(self, buckets: NDArray[np.int64], per_seq: NDArray[np.int64], log_ratio: Array) -> None:
        """New factors from rows in the order recorded: each one's bucket, drafts per sequence and
        log(measured / predicted)."""
        used, self._used = self._used, set()
        self._rows = (buckets, per_seq, log_ratio)
        self._factors = {}
        for bucket in sorted(used):
            self._bucket_factors(bucket)

    def _bucket_factors(self, bucket: int) -> tuple[Array, Array, Array] | None:
        """The bucket's factors from the last fit's rows (None where it had none), fitted at first use."""
        if bucket in self._factors:
            return self._factors[bucket]
        factors = None
        if self._rows is not None:
            buckets, per_seq, log_ratio = self._rows
            in_bucket = np.flatnonzero(buckets == bucket)  # oldest first
            if len(in_bucket):
                factors = time_blocked_factors(
                    log_ratio[in_bucket], per_seq[in_bucket], self.block_size, self.pseudo_count
                )
        self._factors[bucket] = factors
        return factors

    def archive(self, bucket: int, block: Array, per_seq: NDArray[np.int64]) -> None:
        """Keep a block of rows leaving the cost model's ring if it relates two K (each in 4 of its rows or
        more; `per_seq`: its rows' drafts per sequence)."""
        _, counts = np.unique(per_seq, return_counts=True)
        if self.max_archived_blocks and np.count_nonzero(counts >= 4) >= 2:
            blocks = self._archived.setdefault(bucket, [])
            blocks.append(block.copy())
            del blocks[: -self.max_archived_blocks]

    def archived_blocks(self) -> list[Array]:
        return [block for blocks in self._archived.values() for block in blocks]
