"""The cost model's settings (`policy.cost_model`), each with the measurement that set it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from policy.routing import RoutingConfig

# Which drafts the drafter runs beyond each request's own K_r (`CostModelConfig.draft_padding`).
DraftPadding = Literal["none", "batch", "drafting"]


@dataclass(frozen=True)
class CostModelConfig:
    routing: RoutingConfig
    # Most recent measured iterations kept for the fit, per batch-size bucket (`batch_bucket`). One ring for
    # every batch size (512 iterations) forgot a batch size during a stretch at another: served on the regime
    # pair (vLLM backend, session 27), after cells at batch 1 and 4 (about 500 iterations) the fit held almost
    # no batch-16 rows, and at the next cell's start it put drafting at batch 16 (acceptance 0.84) at
    # 1.04-1.13x plain decoding, where static K = 4 ran 1.41x vLLM without speculation; the same prediction
    # for K = 4 ranged 0.87-2.75x over the run's cell starts. Replayed with a ring per bucket: 1.54-1.91x.
    # Over the drafting-against-plain step groups of each cell (`bench.replay_record`), the prediction's
    # error relative to plain's fell from 0.136 to 0.103 (demo pair) and 0.119 to 0.106 (regime pair).
    # Measured served at 256 per bucket (session 28); 512, so that under 512 rows in all the fit is the single
    # ring's: at 256, a closed-loop test (batch 1 then 4, seed 3) drafted mean K 0.11 at batch 4 (it needs 0.9).
    max_samples_per_bucket: int = 512
    min_samples: int = 8  # the prior is used until this many iterations were measured
    refit_interval: int = 16  # refit after this many new iterations (sooner while there are few)
    # ... and once those iterations took this many seconds between them. A refit took 1.7 ms of CPU on a
    # served record of the demo pair replayed (6 batch-size buckets, 4200 rows with the archived blocks) and
    # 2-3x that served; every 16 iterations of 5-15 ms that is 1-2% of the engine core's time, on a CPU the
    # worker shares (on these 2 cores a side process busy 0.1-0.6 ms in every 10 slowed 2-thread matmuls by
    # 1.1-1.8x its busy time), and on a GPU the engine core's time is the scheduler's. A floor in seconds bounds
    # the refits' share of the time at a few per second, however short the iterations; where they take
    # 50 ms or more (the regime pair), every 16 still refits.
    refit_min_seconds: float = 0.25
    # ... where none of the new iterations drafted (plain decode steps, steps with prompts that did not draft):
    # then only plain decoding's level moves, and it drifts over minutes, not seconds (`_local_levels`). A
    # refit had grown to 4.2 ms of CPU, replayed over a served record of the demo pair at batch 28-32 (session
    # 67: the prompt steps' levels and the shape correction over 512 rows a bucket): every 16 plain steps of
    # 20 ms, 0.12 ms a step, a third of the chooser's CPU there, where auto drafted in no step of six cells and
    # its steps ran 1.6% longer than our scheduler's at K = 0. With this floor, 0.04 ms a step.
    plain_refit_min_seconds: float = 2.0
    prior_weight: float = 0.01  # pull toward the prior, relative to one iteration's relative residual
    # The drafts the drafter runs, whose per-sequence term counts them (`policy.cost_fit.drafted_tokens`):
    # - "none": each request's own K_r, sum K_r in all (our native drafter);
    # - "batch": max K for every sequence of the batch, whatever its own K (vLLM's draft model: the engine
    #   verifies K_r of them), batch * max K;
    # - "drafting": max K for every sequence at K_r > 0 (our vLLM worker drafting for those alone,
    #   `cluster/vllm_backend/drafter_rows.py`), max K * the requests that draft. Charged as "batch" (session
    #   68), the model put the drafter at batch 14-16 flat at 5.7-6.6 ms where it took 3.1 ms plus 0.7 ms a
    #   drafting request (3.8-5.1 ms with 2 drafting, 13.8 with 15), fitted a drafted token at 0.075 ms (prior
    #   0.45) and tested at a loss; charged as "none" (sum K, session 46), a ragged K vector was undercounted
    #   (its requests each draft max K), and auto lost 6% at synthetic 16.
    draft_padding: DraftPadding = "none"
    # The shape correction (module docstring): the pull of each K's shape toward the parametric form's, in
    # iterations (a K measured beside another in this many iterations counts half).
    correction_pseudo_count: float = 8.0
    prompt_window: int = 128  # iterations the prompt tokens per iteration (and their share) are averaged over
    # The pull of a verification token's cost in steps with prompts toward its cost in a decode step
    # (`policy.prompt_steps`), in steps. At 8, a fit over 80 steps with prompts recovered 0.7x the cost they
    # were given (`tests/policy/test_cost_model.py`): relative to their time, a step's verification tokens fall
    # as its prompts grow, so little of the steps' spread is the verification tokens' own.
    prompt_pseudo_count: float = 2.0
    # A bucket's rows per time block of the shape correction (`policy.shape_correction`). Shorter blocks
    # predict better and served no better (session 36): replayed over five served records on the regime pair
    # (sessions 34-35, vLLM backend), drafting's error relative to plain decoding per cell and bucket
    # (`bench.replay_record`'s `relative_error`) was 0.089 at 32 rows, 0.078 at 16, 0.069 at 8 and 0.083 at 4;
    # served side by side, auto with blocks of 8 over auto with 32 ran 1.03 on synthetic (9 runs) and 0.95 /
    # 0.97 on prose (9 and 12 runs; prose at batch 1 0.93 / 0.95), 0.98 paired over 30 runs.
    correction_block: int = 32
    # Blocks that measured two K at once, kept per bucket for the shape correction after they left the ring
    # (module docstring): a stretch at one K (a plain cell at batch 1 is about 900 iterations) would otherwise
    # take every block that related the other K to it out of the fit.
    max_archived_blocks: int = 16

    def __post_init__(self) -> None:
        if self.draft_padding not in get_args(DraftPadding):
            raise ValueError(f"draft_padding={self.draft_padding!r} must be one of {get_args(DraftPadding)}")
        if not self.prompt_pseudo_count > 0.0:
            raise ValueError(f"prompt_pseudo_count={self.prompt_pseudo_count} must be > 0")
        if self.prompt_window < 1:
            raise ValueError(f"prompt_window={self.prompt_window} must be >= 1")
        if self.correction_block < 1 or self.max_samples_per_bucket % self.correction_block:
            raise ValueError(
                f"correction_block={self.correction_block} must be >= 1 and divide "
                f"max_samples_per_bucket={self.max_samples_per_bucket}"
            )
        if self.max_archived_blocks < 0:
            raise ValueError(f"max_archived_blocks={self.max_archived_blocks} must be >= 0")
        if not self.correction_pseudo_count > 0.0:
            raise ValueError(f"correction_pseudo_count={self.correction_pseudo_count} must be > 0")
        if self.refit_min_seconds < 0.0:
            raise ValueError(f"refit_min_seconds={self.refit_min_seconds} must be >= 0")
        if self.plain_refit_min_seconds < 0.0:
            raise ValueError(f"plain_refit_min_seconds={self.plain_refit_min_seconds} must be >= 0")
        if self.min_samples < 3:
            raise ValueError(f"min_samples={self.min_samples} must be >= 3 (three parameters per fit)")
        if self.max_samples_per_bucket < self.min_samples:
            raise ValueError(
                f"max_samples_per_bucket={self.max_samples_per_bucket} must be >= min_samples={self.min_samples}"
            )
        if self.refit_interval < 1:
            raise ValueError(f"refit_interval={self.refit_interval} must be >= 1")
        if self.prior_weight < 0.0:
            raise ValueError(f"prior_weight={self.prior_weight} must be >= 0")
