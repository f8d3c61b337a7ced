"""The vllm backend's configuration, without vLLM: scheduler settings, per-request K, engine arguments, the app."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.choosers import make_chooser
from cluster.config import AppConfig, PolicySettings
from cluster.vllm_backend.server import SCHEDULER_CLS, WORKER_CLS, engine_args, token_logprobs_of
from cluster.vllm_backend.settings import (
    ADDITIONAL_CONFIG_KEY,
    MULTIPROC_EXECUTOR,
    UNIPROC_EXECUTOR,
    SchedulerSettings,
    executor_backend,
    parse_num_spec_tokens,
)
from policy.batch_aware import BatchAwareChooser
from workers.target import TargetInfo


def test_settings_round_trip_through_additional_config() -> None:
    settings = SchedulerSettings(
        policy=PolicySettings(kind="cascade", window_iterations=8), ray_address="10.0.0.1:6379", source="r1"
    )
    again = SchedulerSettings.from_additional_config(settings.to_additional_config())
    assert again == settings
    assert again.uses_central_actor


def test_settings_default_standalone_and_refuse_unknown_keys() -> None:
    settings = SchedulerSettings.from_additional_config(None)
    assert settings.policy.kind == "auto" and not settings.uses_central_actor  # no Ray address: local chooser
    with pytest.raises(ValueError, match="moespec"):
        SchedulerSettings.from_additional_config({ADDITIONAL_CONFIG_KEY: {"polcy": {}}})
    with pytest.raises(ValueError, match="policy.kind"):
        SchedulerSettings.from_additional_config({ADDITIONAL_CONFIG_KEY: {"policy": {"kind": "fast"}}})


def test_the_predicted_gain_to_leave_plain_decoding_reaches_the_chooser() -> None:
    settings = SchedulerSettings.from_additional_config(
        {ADDITIONAL_CONFIG_KEY: {"policy": {"min_predicted_gain": 0.12}}}
    )
    info = TargetInfo(vocab_size=64, eos_token_ids=(), num_experts=8, top_k=2, max_seqs=8, max_seq_len=256)
    chooser = make_chooser(settings.policy, info, 4)
    assert isinstance(chooser, BatchAwareChooser) and chooser.config.min_predicted_gain == 0.12
    with pytest.raises(ValueError, match="policy.min_predicted_gain"):
        SchedulerSettings.from_additional_config(
            {ADDITIONAL_CONFIG_KEY: {"policy": {"min_predicted_gain": -0.1}}}
        )


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("auto", None), ("off", 0), (0, 0), (3, 3), (9, 4)]
)
def test_num_spec_tokens_per_request(value: Any, expected: int | None) -> None:
    assert parse_num_spec_tokens(value, max_spec_tokens=4) == expected


@pytest.mark.parametrize("value", [-1, "three", 2.5, True])
def test_num_spec_tokens_refuses_bad_values(value: Any) -> None:
    with pytest.raises(ValueError, match="num_spec_tokens"):
        parse_num_spec_tokens(value, max_spec_tokens=4)


def test_backend_field_is_validated() -> None:
    assert AppConfig.from_args(None).engine.backend == "native"
    assert AppConfig.from_args({"engine": {"backend": "vllm"}}).engine.backend == "vllm"
    with pytest.raises(ValueError, match="engine.backend"):
        AppConfig.from_args({"engine": {"backend": "tgi"}})


def test_engine_args_carry_our_scheduler_and_k_max() -> None:
    config = AppConfig.from_args({"engine": {"backend": "vllm", "max_spec_tokens": 4}})
    settings = SchedulerSettings(policy=config.policy, metrics_path="/tmp/x.json")
    args = engine_args(config, settings, is_cpu=True)
    assert args["scheduler_cls"] == SCHEDULER_CLS and args["async_scheduling"] is False
    assert args["worker_cls"] == WORKER_CLS
    assert args["distributed_executor_backend"] == MULTIPROC_EXECUTOR
    assert args["speculative_config"]["num_speculative_tokens"] == 4
    assert args["speculative_config"]["method"] == "draft_model"
    assert SchedulerSettings.from_additional_config(args["additional_config"]) == settings
    no_draft = AppConfig.from_args({"engine": {"backend": "vllm"}, "model": {"draft": None}})
    assert "speculative_config" not in engine_args(no_draft, settings, is_cpu=True)
    assert engine_args(config, settings, is_cpu=False)["distributed_executor_backend"] == UNIPROC_EXECUTOR


def test_a_cpu_kv_cache_may_be_a_fraction_of_a_gib() -> None:
    """On CPU builds the KV cache goes through vLLM's kv_cache_memory_bytes, not VLLM_CPU_KVCACHE_SPACE (whole
    GiB, and it overrides the engine argument); on GPUs gpu_memory_utilization sizes it."""
    config = AppConfig.from_args({"engine": {"backend": "vllm"}, "vllm": {"cpu_kv_cache_gib": 0.25}})
    settings = SchedulerSettings(policy=config.policy, metrics_path="/tmp/x.json")
    assert engine_args(config, settings, is_cpu=True)["kv_cache_memory_bytes"] == 2**28
    assert "kv_cache_memory_bytes" not in engine_args(config, settings, is_cpu=False)
    with pytest.raises(ValueError, match="cpu_kv_cache_gib=0"):
        AppConfig.from_args({"vllm": {"cpu_kv_cache_gib": 0}})
    engine_args_cls = pytest.importorskip("vllm.engine.arg_utils").AsyncEngineArgs
    assert engine_args_cls(**engine_args(config, settings, is_cpu=True)).kv_cache_memory_bytes == 2**28


def test_the_executor_is_vllms_choice_of_process_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert executor_backend(is_cpu=True) == MULTIPROC_EXECUTOR  # vLLM's CPU build needs processes
    assert executor_backend(is_cpu=False) == UNIPROC_EXECUTOR  # one GPU: in-process
    assert executor_backend(is_cpu=False, world_size=2) == MULTIPROC_EXECUTOR
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    assert executor_backend(is_cpu=True) == UNIPROC_EXECUTOR


class _Logprob:  # vLLM's Logprob record: the value and the rank in the vocabulary
    def __init__(self, logprob: float, rank: int) -> None:
        self.logprob, self.rank = logprob, rank


def test_vllm_logprobs_become_ours_chosen_token_first_then_the_top_ones_by_rank() -> None:
    # Per position vLLM gives the chosen token and the top n (the chosen one may rank below them).
    positions = [
        {7: _Logprob(-2.5, 3), 1: _Logprob(-0.1, 1), 4: _Logprob(-1.2, 2)},
        {4: _Logprob(-0.2, 1), 9: _Logprob(-1.9, 2)},
    ]
    ours = token_logprobs_of([7, 4], positions, 2)
    assert [(t.token_id, t.logprob) for t in ours] == [(7, -2.5), (4, -0.2)]
    assert [t.top for t in ours] == [[(1, -0.1), (4, -1.2)], [(4, -0.2), (9, -1.9)]]
    assert token_logprobs_of([7], None, None) == []  # the request asked for none
