"""bench.vllm_policy_offline without vLLM: each offline mode builds the engine it names."""

from __future__ import annotations

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
    assert offline_engine_args("ours3", common, draft)["speculative_config"]["num_speculative_tokens"] == 4
    with pytest.raises(ValueError, match="offline mode 'oursx'"):
        offline_engine_args("oursx", common, draft)
