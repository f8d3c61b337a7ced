"""The K chooser the scheduler runs inside vLLM's engine-core process, built from its settings and vLLM's
config: the same choosers, cost-model prior and measured guard as the native router.

How the engine core reaches the central SpecPolicy actor: vLLM runs the scheduler in its own engine-core
process, a child of the Serve replica that Ray does not know about. That process joins the Ray cluster as a
driver (`ray.init(address=<the replica's GCS address>)`, passed in the settings) and reports through the
native router's `PolicyClient`: one msgspec-encoded report in flight per window, never blocking a step,
with the local chooser as the fallback. Why not relay through the replica: the scheduler's statistics are
born in the engine core, and vLLM's channel to the front end (EngineCoreOutputs) carries no custom fields,
so a relay would need a side channel of its own as well as a second hop on every report.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster.choosers import (
    DEFAULT_PRIOR,
    GPU_HARDWARE,
    Hardware,
    analytic_prior,
    make_chooser,
    new_cost_model,
    shared_chooser_factory,
)
from cluster.vllm_backend.settings import WORKER_CLS, DraftMeasurement, SchedulerSettings, drafts_alone
from policy.cost_model import CostModel, CostParams
from policy.cost_model_config import DraftPadding
from policy.guard import GuardConfig, MeasuredGuard
from policy.prompt_steps import NO_CUE
from policy.stats import IterationStats, KChooser, RequestIterationStats
from workers.config import ModelConfig
from workers.target import TargetInfo

logger = logging.getLogger(__name__)

# A plain step is reported `is_near_drafting` when the drafter ran at its end or when one of the last this many
# steps drafted or verified. Served on the demo pair (2 cores, the API server beside the engine), plain steps
# at batch 1 took 6.2 / 5.5 / 4.8 ms in the first / second / third step after drafting, 4.6 ms later on; at
# batch 4, 8.3 / 7.8 / 6.9 against 6.8 ms.
NEAR_DRAFTING_STEPS = 2
# So a guard's baseline takes 4 plain steps for one measured sample (the first two follow drafting, the last
# drafts at its end), and runs a quarter as often as the default's 1 in 16.
GUARD = GuardConfig(baseline_length=4, baseline_every=64)


def build_chooser(
    settings: SchedulerSettings, vllm_config: Any, max_spec_tokens: int, source: str
) -> tuple[KChooser, CostModel]:
    """The chooser, and the cost model of the engine's own chooser. That cost model leaves its refits to the
    caller (`CostModel.defers_refits`): the scheduler runs them while the worker runs a step."""
    policy = settings.policy
    info = target_info(vllm_config)
    prior = step_prior(vllm_config)
    # vLLM drafts the batch's max K for every request (the scheduler cuts what is verified); our worker drafts
    # for the requests at K > 0 alone where it can (`drafts_requests_alone`), max K for each of them.
    padding: DraftPadding = "drafting" if drafts_requests_alone(vllm_config) else "batch"
    cost_model = new_cost_model(info, prior, padding)
    cost_model.defers_refits = True
    local = make_chooser(policy, info, max_spec_tokens, cost_model, prior)
    if policy.kind in ("off", "static"):
        return local, cost_model
    if not settings.uses_central_actor:
        return MeasuredGuard(local, GUARD), cost_model
    import ray  # only under our Serve app: standalone vLLM needs no Ray

    from cluster.policy_actor import POLICY_NAMESPACE, PolicyClient, policy_actor_handle

    if not ray.is_initialized():
        ray.init(
            address=settings.ray_address,
            namespace=POLICY_NAMESPACE,
            log_to_driver=False,
            configure_logging=False,
        )
    factory = shared_chooser_factory(policy, info, max_spec_tokens, prior, padding)
    client = PolicyClient(
        source, local, lambda: policy_actor_handle(policy.actor_name, policy.window_iterations, factory)
    )
    return MeasuredGuard(client, GUARD), cost_model


def target_info(vllm_config: Any) -> TargetInfo:
    """What the choosers need to know about the target, from vLLM's view of its Hugging Face config."""
    model = vllm_config.model_config
    hf = model.hf_text_config
    num_experts = int(
        getattr(hf, "num_local_experts", None)
        or getattr(hf, "num_experts", None)
        or getattr(hf, "n_routed_experts", 0)
        or 0
    )
    top_k = int(getattr(hf, "num_experts_per_tok", 0) or 0) if num_experts else 0
    eos = getattr(hf, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return TargetInfo(
        vocab_size=model.get_vocab_size(),
        eos_token_ids=eos_ids,
        num_experts=num_experts,
        top_k=top_k,
        max_seqs=vllm_config.scheduler_config.max_num_seqs,
        max_seq_len=model.max_model_len,
    )


class DrafterLag:
    """The scheduler's copy of our worker's `CatchUpWorker.lag_from`: per request, the first position whose
    draft KV is missing, so that the chooser's outlook names the catch-up a request would pay if it drafted
    next (`RequestOutlook.num_catch_up_tokens`).

    A step with no draft steps (our worker skips the drafter) leaves every request in it lagging from its
    position before the step; a step that drafts catches up the requests at K > 0, and the others lag from it
    on too where the worker drafts for the requests at K > 0 alone (`drafts_alone`, drafter_rows.py); where
    vLLM's pass runs over the whole batch, it keeps every request that did not lag whole. A request not seen
    yet has nothing to catch up: its prompt completes in the step being chosen, and goes through the drafter
    with it if it drafts (the cost model charges arriving prompts to drafting iterations). Counted from the last
    step a request drafted at instead (session 33 and before), the outlook charged the whole prompt to a
    request whose prompt had come in with a drafting step, and charged again, to the choice made ahead while
    the worker ran that step, the catch-up the step had just paid. In the step records of a served run on the
    regime pair (session 34, 16 cells, two rounds), 3,964 outlooks named a catch-up for a request whose draft
    KV was whole, 1,645 of them for a request then chosen K = 0 in a step that drafted (1,283 at batch 17-32),
    where `BatchAwareChooser._repaid` weighs the catch-up against what drafting saves. `skips_drafter`: False
    under vLLM's runner, which runs its pass every step: no request ever lags."""

    def __init__(self, *, skips_drafter: bool, drafts_alone: bool = False) -> None:
        self._skips_drafter = skips_drafter
        self._drafts_alone = drafts_alone
        self._lag_from: dict[str, int] = {}

    def step(self, computed: Mapping[str, int], drafting: frozenset[str]) -> None:
        """A step: `computed`, each scheduled request's positions computed before it; `drafting`, the requests
        the drafter drafts for at its end (K > 0; empty: the drafter is skipped)."""
        for request_id in drafting:  # caught up, and drafted from whole draft KV
            self._lag_from.pop(request_id, None)
        if not self._skips_drafter or (drafting and not self._drafts_alone):
            return
        for request_id, start in computed.items():
            if request_id not in drafting:
                self._lag_from[request_id] = min(self._lag_from.get(request_id, start), start)

    def catch_up_tokens(self, request_id: str, num_tokens: int) -> int:
        lag_from = self._lag_from.get(request_id)
        return 0 if lag_from is None else max(0, num_tokens - lag_from)

    def forget(self, request_id: str) -> None:
        self._lag_from.pop(request_id, None)

    @property
    def lag_from(self) -> dict[str, int]:
        """Per lagging request, its first position whose draft KV is missing (a copy)."""
        return dict(self._lag_from)


class NearDrafting:
    """Tells, step by step, which steps are near drafting (`NEAR_DRAFTING_STEPS`)."""

    def __init__(self) -> None:
        self._num_quiet_steps = NEAR_DRAFTING_STEPS  # steps in a row, up to the last, that did neither

    def step(self, *, drafts_at_end: bool, verified: bool) -> bool:
        """Whether this step is near drafting: `drafts_at_end`, the drafter runs at its end; `verified`, it
        verified drafts."""
        is_near = drafts_at_end or self._num_quiet_steps < NEAR_DRAFTING_STEPS
        self._num_quiet_steps = 0 if drafts_at_end or verified else self._num_quiet_steps + 1
        return is_near


def decoding_requests(
    scheduler_output: Any, output: Any, requests: Mapping[str, Any]
) -> list[RequestIterationStats]:
    """What each decoding request did in a step (`scheduler_output`, the model runner's `output`; `requests`:
    the scheduler's by id); read before vLLM rolls back rejected positions."""
    sampled = output.sampled_token_ids
    invalid = scheduler_output.num_invalid_spec_tokens or {}
    decoding = []
    for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
        request = requests.get(request_id)
        index = output.req_id_to_index.get(request_id)
        if request is None or index is None or not sampled or not sampled[index]:
            continue  # finished meanwhile, or a prefill chunk that samples nothing
        drafts = scheduler_output.scheduled_spec_decode_tokens.get(request_id, [])
        num_drafts = len(drafts) - invalid.get(request_id, 0)
        if num_tokens != len(drafts) + 1:
            continue  # (the end of) a prefill: not a decode step of this request
        generated = sampled[index]
        decoding.append(
            RequestIterationStats(
                request_id=request_id,
                num_spec_tokens=num_drafts,
                num_accepted_tokens=max(0, len(generated) - 1),
                num_committed_tokens=len(generated),
                context_len=request.num_computed_tokens - num_tokens,
            )
        )
    return decoding


def iteration_stats(
    step: int,
    requests: list[RequestIterationStats],
    step_time_s: float,
    draft: DraftMeasurement | None,
    previous: DraftMeasurement,
    *,
    is_near_drafting: bool = False,
    num_prefill_tokens: int = 0,
    gap_s: float = 0.0,
    prompt_cue: int = NO_CUE,
) -> IterationStats:
    """One iteration of the policy from one vLLM step: the drafts verified in the step were drafted at the end
    of the step before (`previous`), and the drafting at the end of this step (`draft`) is the next
    iteration's, so verify time = step time - `draft.time_s`. `draft` None (not our worker): the whole
    step is verify time. `is_near_drafting`: from `NearDrafting` (`IterationStats.is_near_drafting`);
    `num_prefill_tokens`: other requests' prompt tokens in the step (`IterationStats.num_prefill_tokens`);
    `prompt_cue`: that of the choice whose drafts the step verifies (`IterationStats.prompt_cue`).

    `gap_s`: the engine core's time between the step before and this one (vLLM's post-step work, output
    processing). It counts in the verify time of a step without prompts: after a step that drafted it holds
    the engine core's fetch of the drafts from the worker process, which the step verifies. Served on the
    regime pair (vLLM's CPU build, the worker in its own process), it was 1.5-3 ms before a step that
    verified drafts and 0.1 ms before a plain one, 3-5% of a drafting step at batch 4 that neither the cost
    model nor the guard saw. A step with prompts is left out of both anyway, and the gap before it may be
    idle time (the first step after the engine had no requests)."""
    return IterationStats(
        iteration=step,
        batch_size=len(requests),
        requests=requests,
        num_target_tokens=sum(r.num_spec_tokens + 1 for r in requests),
        draft_time_s=0.0 if draft is None else previous.time_s,
        verify_time_s=(step_time_s if draft is None else max(step_time_s - draft.time_s, 0.0))
        + (0.0 if num_prefill_tokens else gap_s),
        other_time_s=0.0,
        num_draft_prefill_tokens=0 if draft is None else previous.num_prefill_tokens,
        is_near_drafting=is_near_drafting,
        num_prefill_tokens=num_prefill_tokens,
        prompt_cue=prompt_cue,
    )


def measures_draft_time(vllm_config: Any) -> bool:
    """Whether the engine runs our `CatchUpWorker`, which measures the drafter's time every step (runner.py):
    the scheduler then reports each step's draft and verify time apart."""
    return str(getattr(vllm_config.parallel_config, "worker_cls", "")) == WORKER_CLS


def drafts_requests_alone(vllm_config: Any) -> bool:
    """Whether the engine runs our worker drafting for the requests at K > 0 alone (`settings.drafts_alone`)."""
    return measures_draft_time(vllm_config) and drafts_alone(vllm_config.speculative_config)


def prior_hardware(vllm_config: Any) -> Hardware:
    """The machine figures the prior starts from: a GPU's where vLLM runs on GPUs (`GPU_HARDWARE`, its
    bandwidth and FLOP/s times the tensor-parallel GPUs that share each forward's weights), else the CPU's
    (`Hardware`'s defaults). The per-layer overheads stay one GPU's, and the all-reduces between the GPUs are
    not in the prior's form: the online fit learns them."""
    device_type = getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu")
    if device_type != "cuda":
        return Hardware()
    num_gpus = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
    return dataclasses.replace(
        GPU_HARDWARE,
        bandwidth_bytes_s=GPU_HARDWARE.bandwidth_bytes_s * num_gpus,
        flops=GPU_HARDWARE.flops * num_gpus,
    )


def step_prior(vllm_config: Any) -> CostParams:
    """The cost model's starting point for a vLLM step, in the terms the scheduler measures.

    With our worker, a step is reported as the drafter's time (measured in the worker, catch-up included:
    `draft_*` terms) and the rest of the step (verify terms): the time outside the forwards is folded into
    the verify terms, the call to the drafter into its per-step term. The draft terms must stay apart:
    folded into the verify terms (as before the worker measured them), a fit on batch-1 steps charged the
    drafter's steps to each verified token and predicted drafting at batch 4 at twice its cost
    (tests/cluster/vllm_backend/test_chooser.py).
    Without our worker (vLLM's runner: its drafter pass runs every step, K = 0 included) the whole step is
    reported as verify time, and every term is folded into the verify terms."""
    spec = vllm_config.speculative_config
    target_dir = Path(vllm_config.model_config.model)
    draft_dir = Path(spec.draft_model_config.model) if spec is not None and spec.draft_model_config else None
    try:
        target = ModelConfig.from_dir(target_dir)
        draft = ModelConfig.from_dir(draft_dir) if draft_dir is not None else None
    except (OSError, ValueError, KeyError) as error:  # a hub id, or an architecture we do not model
        logger.info("cost-model prior: generic values (%s)", error)
        prior = DEFAULT_PRIOR
    else:
        bytes_per_param = 2 if "16" in str(vllm_config.model_config.dtype) else 4
        prior = analytic_prior(target, draft, bytes_per_param, prior_hardware(vllm_config))
    verify = dataclasses.replace(
        prior,
        fixed_s=prior.fixed_s + prior.other_s,
        per_token_s=prior.per_token_s + prior.other_per_token_s,
        other_s=0.0,
        other_per_token_s=0.0,
        draft_call_s=0.0,
    )
    if measures_draft_time(vllm_config):
        return dataclasses.replace(verify, draft_fixed_s=prior.draft_fixed_s + prior.draft_call_s)
    return dataclasses.replace(
        verify,
        fixed_s=verify.fixed_s + prior.draft_call_s + prior.draft_fixed_s,
        per_token_s=verify.per_token_s + prior.draft_per_token_s,
        draft_fixed_s=0.0,
        draft_per_token_s=0.0,
        draft_prefill_per_token_s=0.0,
    )
