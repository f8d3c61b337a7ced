"""The cost probe of `policy.batch_aware`: a few iterations one K above the batch's choice, so that the cost
model measures again a level of drafting that its choices no longer visit.

The optimum never chooses a K that the cost model prices too high, so nothing measures that K again, and the
price stands. Served on the regime pair (vLLM backend, session 37), the ring of batch 17-32 held 14 steps
that verified 2 drafts per sequence and 6 that verified 3, all from the server's first 60 steps at that size
(a step at 3 drafts per sequence 3.3-3.5x a plain one, against about 2.75x implied by static K = 3's 1.21x over
off, pooled over 14 runs). Nothing replaced them for two of the run's three rounds: the chooser ran K = 0 or
1 at synthetic 32 (mean K 0.1-0.5), where static K = 3 paid 1.21x.

So where the batch drafts at a measured level (drafts per sequence, rounded, as the shape correction counts
them), the level above (every drafting request one K higher) was last measured `probe_spacing` or more of
the bucket's iterations ago (or never), and the model predicts that level within `probe_tolerance` of the
choice's tokens per second, the next `probe_iterations` choices run it. Each level is probed at most once
per `probe_spacing` choices in a bucket, whether or not its rows reached the model (the engine verified the
raised K, no prompt shared the step): at most `probe_iterations` / `probe_spacing` of a bucket's iterations
per level, each at a predicted loss under `probe_tolerance`.

A probe falls due on the optimum (the choice before tests): where the model would not draft, there is no level
to probe above, and a test's forced drafting keeps its own K (the test budget counts its iterations). Not
alone in the batch: there the level is the one request's K, which its tests and the optimum move through as
its acceptance moves, and in the vLLM backend's closed loop at batch 1 (`tests/cluster/vllm_backend`, six
seeds) probes there changed which K the traffic's acceptance was measured at, and two seeds then started
their later requests untested at K = 0 (0.98-0.99x of the best static K, 1.05-1.10x without).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from policy.cost_model import CostModel, batch_bucket
from policy.k_search import tokens_per_second

if TYPE_CHECKING:
    from policy.batch_aware import BatchAwareConfig

Array = NDArray[np.float64]


class CostProbe:
    def __init__(self, config: BatchAwareConfig, cost_model: CostModel) -> None:
        self.config = config
        self.cost_model = cost_model
        self._remaining = 0  # choices left in the probe under way
        self.num_probes = 0
        self._num_choices: dict[int, int] = {}  # by batch-size bucket
        self._last_probes: dict[tuple[int, int], int] = {}  # by (bucket, level): its count of choices then

    def apply(self, chosen: list[int], optimum: list[int], rates: Array, times: Array) -> list[int]:
        """The choice, or the probe's while one is under way or due on the optimum (the choice before tests);
        `times` as in `BatchAwareChooser.best_spec_tokens`."""
        bucket = batch_bucket(len(chosen))
        self._num_choices[bucket] = self._num_choices.get(bucket, 0) + 1
        if not self._remaining:
            level = self._due_level(optimum, rates, times)
            if level is None:
                return chosen
            self._last_probes[bucket, level] = self._num_choices[bucket]
            self._remaining = self.config.probe_iterations
            self.num_probes += 1
        self._remaining -= 1
        return self._raised(chosen, optimum)

    def _raised(self, chosen: list[int], optimum: list[int]) -> list[int]:
        """One K more for each request the optimum drafts (a test the optimum does not cover keeps its probe:
        the test budget counts its iterations, `policy.test_phase`)."""
        max_k = self.config.max_spec_tokens
        return [k + 1 if o > 0 and k < max_k else k for k, o in zip(chosen, optimum, strict=True)]

    def _due_level(self, optimum: list[int], rates: Array, times: Array) -> int | None:
        """The level to probe now, if any."""
        raised, num, spacing = self._raised(optimum, optimum), len(optimum), self.config.probe_spacing
        level, above = int(np.rint(sum(optimum) / num)), int(np.rint(sum(raised) / num))
        if not self.config.probe_iterations or num < 2 or above <= level:
            return None  # alone in the batch: see the module docstring; not above: nothing new to measure
        # From measured ground only: where the choice's own level is unmeasured, the model's prices rest on its
        # prior, and the choice itself is what measures them.
        level_age, above_age = self.cost_model.level_age(num, level), self.cost_model.level_age(num, above)
        if level_age is None or (above_age is not None and above_age < spacing):
            return None
        bucket = batch_bucket(num)
        last = self._last_probes.get((bucket, above))
        if last is not None and self._num_choices[bucket] - last < spacing:
            return None
        optimum_rate = tokens_per_second(rates, optimum, times)
        is_close = (
            tokens_per_second(rates, raised, times) >= (1.0 - self.config.probe_tolerance) * optimum_rate
        )
        return above if is_close else None
