"""bench.vllm_policy_offline without vLLM: each offline mode builds the engine it names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.vllm_policy_offline import offline_engine_args


def test_offline_modes_build_each_engine() -> None:
    common = {"model": "t"}
    draft = Path("d")
    assert offline_engine_args("off", common, draft) == common
    assert offline_engine_args("2", common, draft)["speculative_config"]["num_speculative_tokens"] == 2
    assert "scheduler_cls" not in offline_engine_args("2", common, draft)
    ours = offline_engine_args("ours1@1", common, draft)
    assert ours["speculative_config"]["num_speculative_tokens"] == 1
    assert ours["additional_config"] == {"moespec": {"policy": {"kind": "static", "num_spec_tokens": 1}}}
    assert "worker_cls" in ours and "worker_cls" in offline_engine_args("k0", common, draft)
    assert "worker_cls" not in offline_engine_args("k0_vllm", common, draft)
    assert "distributed_executor_backend" in ours
    assert "distributed_executor_backend" not in offline_engine_args("k0_vllm", common, draft)
    assert offline_engine_args("ours3", common, draft)["speculative_config"]["num_speculative_tokens"] == 4
    auto = offline_engine_args("auto", common, draft)
    assert auto["additional_config"] == {"moespec": {"policy": {"kind": "auto"}}} and "worker_cls" in auto
    with pytest.raises(ValueError, match="offline mode 'oursx'"):
        offline_engine_args("oursx", common, draft)


def test_offline_engines_get_the_servers_kv_cache_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, vLLM's CPU build reserved 92% of the machine's memory for the first engine and the second one
    failed to start."""
    import argparse

    import vllm

    from bench.peers import VllmSettings
    from bench.vllm_policy_offline import measure_offline

    seen: list[str | None] = []

    class FakeLLM:
        def __init__(self, **_: object) -> None:
            seen.append(os.environ.get("VLLM_CPU_KVCACHE_SPACE"))

        def generate(self, *_: object, **__: object) -> None:
            return None

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    args = argparse.Namespace(target=Path("t"), draft=Path("d"), dtype="float32", eager=True, max_tokens=4)
    rows = measure_offline(args, ["off", "k0"], "mixed", [2], repeats=1)
    assert seen == [str(VllmSettings.kv_cache_gib)] * 2
    assert rows[0]["batch"] == 2 and "k0_over_off_median" in rows[0]
