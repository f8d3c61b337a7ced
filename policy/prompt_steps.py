"""The cost model's steps that carry new requests' prompts (`policy.cost_model`): how often they come, how many
prompt tokens they carry, and what a verification token costs in them beyond its cost in a decode step.

Why. An engine that schedules prompts into decode steps (vLLM's chunked prefill) runs a request's drafts and
other requests' prompts in one forward, and the drafts do not cost there what they cost in a decode step. On
the regime pair (vLLM's CPU build, session 56) with output lengths that vary, at batch 28-32, drafting K = 2
for every request added 78 ms to a decode step (70.9 to 148.9), 58 ms to one that carried about 80 prompt
tokens (122.4 to 180.1) and 62 ms to one with about 200 (192.1 to 254.1). Against the plain steps, a prompt
token cost 0.61-0.64 ms either way, and a verification token about 0.29 ms less in a step with prompts than
in a decode step. Steps with prompts were half of the cell's time, and the model, fitted on decode steps
alone, priced drafting in them as in a decode step: auto ran 0.94 of static K = 2 on mixed at batch 32.

How. Per batch-size bucket, the steps with prompts are kept apart from the fit's rows (their times would
read as decoding's: `CostModel._record`), and after each refit their times less the model's prediction for
the same step without prompts (at the speed of the decode steps recorded around it: `CostModel._local_levels`)
are fitted, by least squares on relative residuals, as
    residual = prompt_token_s * prompt tokens + spec_token_s * verification tokens,
with spec_token_s of either sign, pulled toward 0 by `pseudo_count` steps that verified as many tokens as the
batch at K = 1 (or the steps' mean, if more). Plain steps with prompts give the first term; steps that draft,
with prompts that vary, the second. The cost model takes the discount at most down to verification tokens that
cost nothing (`CostModel.phase_times`): the drafter's steps cost what they do in a decode step. A prediction
for the next step, which may or may not carry prompts, adds the second term times the bucket's recent share of
steps with prompts: the expected step. The first is left out of predictions, since no choice of K changes it: a
prompt is the same work whatever the batch drafts, and a token's worth is what plain decoding would spend on
it.

The cue. Whether the step that verifies a choice's drafts carries prompts is not chance alone: behind a
client that keeps a number of requests in flight (vLLM's `bench serve --max-concurrency`, a chat front end),
a request that ends is followed by the next one's prompt a step or two later. A choice is made under a prompt
cue (`prompt_cue`: 1 where a request of the batch may generate at most one more token, 0 where none; the
engine gives it with the requests' outlooks), each iteration reports the cue of the choice it verifies
(`IterationStats.prompt_cue`), and the share of steps with prompts is kept per cue too: a choice prices its
step at its cue's share (`share`), the bucket's until the cue was seen `min_steps` times. Traffic whose
prompts arrive whatever the batch does (an open-loop client) finds the same share after either cue: as
before. Served on the regime pair (mixed 16 / 32, four records of auto, steps at batch 17-32), 80-82% of the
steps after cue 1 carried prompts and 6-12% after cue 0, 31-36% in all; the gain was in those steps: our
scheduler at static K = 2 made 2 900 of a cell's 6 000 tokens in steps with prompts at 1.4-1.6x auto's rate
there (1 550 tokens), and ran 1.09x off where auto ran 0.98x (`docs/vllm-backend-measurements.md`). Where
the traffic changes, a cue's share lags it as the bucket's does, and errs further: served after prose (1% of
the steps after cue 0 carried prompts), synthetic's cells priced cue 0 at 4-8% where 38% of them did.

Served (session 57, regime pair, varied lengths, against the model without it): 1.000 over 40 paired runs of
code, prose, synthetic and mixed at batch 16 / 32 (standard error 0.006), mixed 32 1.015 over 8. Fitted there,
spec_token_s was -0.05 to -0.48 ms at batch 17-32 and the share 0.26-0.55: drafting about 5% cheaper in the
expected step. On the demo pair (the draft half a target step) it left auto's K near 0, where drafting loses.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

from policy.stats import RequestOutlook

Array = NDArray[np.float64]
NO_CUE = -1  # an iteration or choice without a prompt cue (an engine that gives no outlooks)
# A recorded step with prompts: (batch, max K, sum K, prompt tokens, the drafter's prefill tokens, measured
# seconds, the cost model's decode rows recorded before it, requests at K > 0). The cost model predicts the
# same step without prompts at each fit (`fit`), at the speed of the decode steps recorded around it.
STEP_SIZE = 8


class PromptSteps:
    """Per batch-size bucket: recent steps with prompts, the share of steps that had them, prompt tokens per
    step, and the fitted cost of a verification token in a step with prompts beyond a decode step's."""

    def __init__(self, *, ring_size: int, window: int, min_steps: int, pseudo_count: float) -> None:
        self.ring_size = ring_size
        self.window = window
        self.min_steps = min_steps
        self.pseudo_count = pseudo_count
        # Per bucket: the recent steps with prompts (`STEP_SIZE` columns), a ring, and how many ever recorded.
        self._steps: dict[int, Array] = {}
        self._num_steps: dict[int, int] = {}
        # Per bucket: (iterations seen, mean prompt tokens per iteration, share of iterations with prompts), as
        # observed; and as of the last fit (predictions read these, so that they change only at a fit).
        self._means: dict[int, tuple[int, float, float]] = {}
        self._fitted_means: dict[int, tuple[float, float]] = {}
        # Per (bucket, cue): (iterations seen, share of them with prompts), as observed; as of the last fit.
        self._cue_means: dict[tuple[int, int], tuple[int, float]] = {}
        self._fitted_cue_shares: dict[tuple[int, int], float] = {}
        self._spec_token_s: dict[int, float] = {}
        self._prompt_token_s: dict[int, float] = {}

    def count(self, bucket: int, num_prompt_tokens: int, cue: int = NO_CUE) -> None:
        """An iteration at this bucket, with these prompt tokens (0 included): the means over about `window`;
        and, where the engine gave the cue of the choice the iteration verifies (`prompt_cue`), the share of
        steps with prompts after that cue."""
        count, tokens, share = self._means.get(bucket, (0, 0.0, 0.0))
        weight = self._weight(count)
        has_prompts = float(num_prompt_tokens > 0)
        self._means[bucket] = (
            count + 1,
            tokens + weight * (num_prompt_tokens - tokens),
            share + weight * (has_prompts - share),
        )
        if cue != NO_CUE:
            count, share = self._cue_means.get((bucket, cue), (0, 0.0))
            self._cue_means[bucket, cue] = (count + 1, share + self._weight(count) * (has_prompts - share))

    def _weight(self, count: int) -> float:
        """A new value's weight in a mean of `count` values so far: their plain mean, then about `window`'s."""
        return max(1.0 / (count + 1), 1.0 / self.window)

    def add(self, bucket: int, step: tuple[float, ...]) -> None:
        """A measured step with prompts (`STEP_SIZE` values)."""
        steps = self._steps.get(bucket)
        if steps is None:
            steps = self._steps[bucket] = np.empty((self.ring_size, STEP_SIZE))
        elif not steps.flags.writeable:  # unpickled zero-copy (a Ray object): take a private copy
            steps = self._steps[bucket] = steps.copy()
        count = self._num_steps.get(bucket, 0)
        steps[count % self.ring_size] = step
        self._num_steps[bucket] = count + 1

    def recorded(self, bucket: int) -> Array:
        """The bucket's recent steps with prompts, in the ring's order (`STEP_SIZE` columns)."""
        steps = self._steps.get(bucket)
        if steps is None:
            return np.empty((0, STEP_SIZE))
        return steps[: min(self._num_steps[bucket], self.ring_size)]

    def buckets(self) -> list[int]:
        return list(self._steps)

    def fit(self, bucket: int, decode_seconds: Array) -> None:
        """Fit the bucket's costs from its recorded steps (`recorded`) and `decode_seconds`, the model's
        prediction for each of them without its prompts (the drafter's prefill tokens charged)."""
        batch, _, spec, prompt, _, seconds, _, _ = self.recorded(bucket).T
        keep = (seconds > 0.0) & (decode_seconds > 0.0)
        if np.count_nonzero(keep) < self.min_steps:
            return
        batch, spec, prompt, seconds = batch[keep], spec[keep], prompt[keep], seconds[keep]
        residual = (seconds - decode_seconds[keep]) / seconds
        design = np.column_stack([prompt / seconds, spec / seconds])
        # Pseudo-steps that say a verification token costs what it does in a decode step (spec_token_s = 0),
        # at the recorded steps' mean time and as many verification tokens as they verified on average, or
        # as the batch's requests at K = 1 if more. At the steps' own mean alone, a bucket whose steps with
        # prompts had drafted little was pulled as little: served on the regime pair (prose 32, session 58),
        # a few such steps that verified one token each, the catch-up of a wave's 2 032 prompt tokens among
        # them, set a verification token's price at -23.6 ms.
        anchor = np.sqrt(self.pseudo_count) * float(max(np.mean(spec), np.mean(batch)) / np.mean(seconds))
        matrix = np.vstack([design, [[0.0, anchor]]])
        (prompt_token_s, spec_token_s), *_ = np.linalg.lstsq(matrix, np.append(residual, 0.0), rcond=None)
        self._prompt_token_s[bucket] = float(prompt_token_s)
        self._spec_token_s[bucket] = float(spec_token_s)

    def freeze_means(self) -> None:
        """Predictions read the means as of now (a fit: the cost model's version changes)."""
        self._fitted_means = {bucket: (tokens, share) for bucket, (_, tokens, share) in self._means.items()}
        self._fitted_cue_shares = {
            key: share for key, (count, share) in self._cue_means.items() if count >= self.min_steps
        }

    def prompt_tokens_per_iteration(self, bucket: int) -> float:
        return self._fitted_means.get(bucket, (0.0, 0.0))[0]

    def share(self, bucket: int, cue: int = NO_CUE) -> float:
        """The share of the bucket's iterations that carried prompts, as of the last fit; given a cue, the
        share of those that followed it (once `min_steps` did; the bucket's until then)."""
        share = self._fitted_means.get(bucket, (0.0, 0.0))[1]
        return self._fitted_cue_shares.get((bucket, cue), share) if cue != NO_CUE else share

    def spec_token_s(self, bucket: int) -> float:
        """What a verification token costs in a step with prompts beyond a decode step's (either sign)."""
        return self._spec_token_s.get(bucket, 0.0)

    def prompt_token_s(self, bucket: int) -> float:
        """What a prompt token adds to a step, as fitted (not in predictions: module docstring)."""
        return self._prompt_token_s.get(bucket, 0.0)

    def expected_spec_token_s(self, bucket: int, cue: int = NO_CUE) -> float:
        """`spec_token_s` times the share of steps with prompts (after this cue): its part of the expected time
        of the step that verifies the drafts chosen now."""
        return self.share(bucket, cue) * self.spec_token_s(bucket)


def prompt_cue(outlook: Iterable[RequestOutlook]) -> int:
    """The cue a choice is made under (`PromptSteps`): 1 where a request of the batch is ending (it may generate
    at most one more token), 0 where none is; `NO_CUE` without outlooks."""
    cue = NO_CUE
    for request in outlook:
        if request.num_remaining_tokens <= 1:
            return 1
        cue = 0
    return cue
