"""bench.vllm_policy_offline without vLLM: each offline mode builds the engine it names."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

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


def test_offline_engines_get_the_servers_kv_cache_size(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Unset, vLLM's CPU build reserved 92% of the machine's memory for the first engine and the second one
    failed to start."""
    import argparse

    import vllm

    import bench.vllm_policy_offline as offline
    from bench.peers import VllmSettings
    from bench.vllm_policy_offline import measure_offline

    seen: list[tuple[int | None, str | None]] = []

    class FakeLLM:
        """Our scheduler's engines append one step to their record per generate call, as the real one does."""

        def __init__(self, **engine: Any) -> None:
            seen.append((engine.get("kv_cache_memory_bytes"), os.environ.get("VLLM_CPU_KVCACHE_SPACE")))
            self.record = engine.get("additional_config", {}).get("moespec", {}).get("record_path")

        def generate(self, *_: object, **__: object) -> None:
            if self.record is not None:
                step = {"step": 1, "num_drafts": {"a": 0}, "num_accepted": {"a": 0}, "chosen": {"a": 0}}
                step |= {"num_draft_steps": 0, "step_time_s": 0.01, "draft_time_s": None, "guard_holds": 0}
                with open(self.record, "a") as record:
                    record.write(json.dumps({**step, "start_s": time.time()}) + "\n")

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")  # (a leftover would override the size)
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(offline, "RAW", tmp_path)
    args = argparse.Namespace(target=Path("t"), draft=Path("d"), dtype="float32", eager=True, max_tokens=4)
    rows = measure_offline(args, ["off", "k0"], "mixed", [2, 3], repeats=2)
    assert seen == [(int(VllmSettings.kv_cache_gib * 2**30), None)] * 2
    assert rows[0]["batch"] == 2 and "k0_over_off_median" in rows[0]
    # Each batch's summary holds the steps of its own runs only (two per batch here); off keeps no record.
    assert [row["k0_scheduler"]["num_steps"] for row in rows] == [2, 2] and "off_scheduler" not in rows[0]
